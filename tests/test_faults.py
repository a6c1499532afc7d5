"""A step is all or nothing: faults injected at each phase of a step leave parameters, states and step counts
bit-identical to before the call, and the next step matches an optimizer that never failed.

Faults: a kernel build (compile or cache load) that raises or is interrupted (KeyboardInterrupt) for the second
dtype of a step, on a first step and on a step whose mode changed; a probe pass that raises for the second
bucket after the first bucket's pass wrote theta + tau d; a closure that raises at the probe point.
"""
import copy

import numpy as np
import pytest
import torch

import memkernels as mk
from memkernels import backends

pytest.importorskip("numba")
if not backends.load("numba").startswith("available"):
    pytest.skip("the numba backend cannot load here", allow_module_level=True)
from memkernels.backends.numba import host as numba_backend  # noqa: E402


def _model():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64)), torch.nn.Parameter(torch.randn(8, 8, dtype=torch.float64))]


def _grads(params, seed):
    torch.manual_seed(seed)
    for p in params:
        p.grad = torch.randn_like(p)


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for k, v in sa["state"][i].items():
            assert torch.equal(v, sb["state"][i][k]) if isinstance(v, torch.Tensor) else v == sb["state"][i][k]


def _faulty(monkeypatch, fault, *, building, name_end=""):
    """_launch raises `fault` for a float64 kernel while it is built (building) or run (not building)."""
    launch = numba_backend._launch

    def faulty(kernel, name, *args):
        f64 = any(isinstance(a, np.ndarray) and a.size == 0 and a.dtype == np.float64 for a in args[2:-2])
        if f64 and backends.is_preparing() == building and name.endswith(name_end):
            raise fault
        return launch(kernel, name, *args)

    monkeypatch.setattr(numba_backend, "_launch", faulty)
    numba_backend._launched.clear()  # every kernel is built again, as in a fresh process
    return launch


@pytest.mark.parametrize("fault", [RuntimeError("corrupt cache entry"), KeyboardInterrupt()],
                         ids=["raise", "ctrl-c"])
@pytest.mark.parametrize("moment", ["first step", "mode change"])
def test_a_failing_kernel_build_changes_nothing(monkeypatch, fault, moment):
    params, twin = _model(), _model()
    opt = mk.AdamW(params, lr=1e-2, backend="numba")
    ref = mk.AdamW(twin, lr=1e-2, backend="numba")
    if moment == "mode change":  # two good steps, then a correction: new kernels on the next step
        for seed in (1, 2):
            for o, ps in ((opt, params), (ref, twin)):
                _grads(ps, seed)
                o.step()
        for o in (opt, ref):
            o.param_groups[0].update(memory_correction=-1.0, hvp="trajectory")
    _grads(params, 3)
    before = _snapshot(opt, params)
    launch = _faulty(monkeypatch, fault, building=True)
    with pytest.raises(type(fault)):
        opt.step()
    _same(before, _snapshot(opt, params))
    monkeypatch.setattr(numba_backend, "_launch", launch)
    opt.step()  # the same gradients, now without the fault
    _grads(twin, 3)
    ref.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin))


@pytest.mark.parametrize("fault", [RuntimeError("kernel failed"), KeyboardInterrupt()], ids=["raise", "ctrl-c"])
def test_a_probe_pass_that_fails_puts_theta_back(monkeypatch, fault):
    """The float32 bucket's probe pass wrote theta + tau d; the float64 one raises: theta comes back from the
    origins, bit for bit, and the state is as before."""
    params = _model()
    opt = mk.AdamW(params, lr=1e-2, memory_correction=-1.0, hvp="probe", backend="numba")

    def closure():
        _grads(params, 5)
        return torch.tensor(0.0)

    opt.step(closure)
    before = _snapshot(opt, params)
    _faulty(monkeypatch, fault, building=False, name_end="probe")
    with pytest.raises(type(fault)):
        opt.step(closure)
    _same(before, _snapshot(opt, params))


def test_a_closure_that_fails_at_the_probe_point_changes_nothing():
    params = _model()
    opt = mk.AdamW(params, lr=1e-2, memory_correction=-1.0, hvp="probe", backend="numba")
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:  # the first step's second call: at theta + tau d
            raise KeyboardInterrupt
        _grads(params, len(calls))
        return torch.tensor(0.0)

    before = _snapshot(opt, params)
    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    _same(before, _snapshot(opt, params))
    assert not opt.state
