import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests need CUDA; they run from bench/gpu_check.sh, and are reported as skipped here."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
