"""The device-table cache shared by the Triton and CUDA backends (backends/_device_tables.py), on the CPU."""
import torch

from memkernels.backends._device_tables import DeviceTables

CPU = torch.device("cpu")


def test_built_once_per_key_and_least_recently_used_out():
    tables, built = DeviceTables("test", capacity=2), []

    def build(n):
        def make():
            built.append(n)
            return torch.full((2,), n), f"info {n}"
        return make

    first, info = tables.get(CPU, 1, build(1))
    assert info == "info 1" and first.tolist() == [1, 1]
    assert tables.get(CPU, 1, build(1))[0] is first and built == [1]  # a hit builds nothing
    tables.get(CPU, 2, build(2))
    tables.get(CPU, 1, build(1))  # 1 is now the most recently used
    tables.get(CPU, 3, build(3))  # evicts 2
    assert len(tables) == 2 and built == [1, 2, 3]
    assert tables.get(CPU, 1, build(1))[0] is first
    tables.get(CPU, 2, build(2))
    assert built == [1, 2, 3, 2]


def test_nothing_to_upload_and_clear():
    tables = DeviceTables("test")
    assert tables.get(CPU, "empty", lambda: (None, (0, 0))) == (None, (0, 0))
    tables.clear()
    assert len(tables) == 0
