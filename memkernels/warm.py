"""`memkernels info --warm`: build the numba kernels of the usual training modes ahead of a run.

A numba kernel compiles at its first call, a few seconds each, so the first step of each mode waits for
its kernels; later processes load them from the disk cache (backends/numba/_cache.py) in well under a
second. This steps every optimizer through the usual modes in fp32 and bf16 on tiny tensors, which builds
and caches those kernels before the run. Not covered: the streaming variants of calls of 16 MiB or more
with the probe (numba.host.STREAM_MIN_BYTES), AMP's scaled gradients and fp16/fp64 params; they build at their
first step.
"""
from __future__ import annotations

import time
import warnings

import torch

from .backends import numba as numba_backend
from .optim import SGD, AdamW, Lion

MODES = {"plain": {}, "track_memory": {"track_memory": True},
         "trajectory correction": {"memory_correction": -1.0, "hvp": "trajectory"},
         "probe correction": {"memory_correction": -1.0, "hvp": "probe"}}
OPTIMIZERS = (AdamW, Lion, SGD)
DTYPES = (torch.float32, torch.bfloat16)


def _steps(opt: torch.optim.Optimizer, p: torch.nn.Parameter, probe: bool) -> None:
    """Three steps: the first has no previous gradient, the later ones estimate H d."""
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (p.float() - 1.0).square().sum()
        loss.backward()
        return loss

    for _ in range(3):
        if probe:
            opt.step(closure)
        else:
            closure()
            opt.step()


def warm() -> str:
    """Build (or load) the kernels; what it did, for the terminal."""
    before, start = len(numba_backend.first_calls), time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # regime warnings of a toy problem
        for cls in OPTIMIZERS:
            for dtype in DTYPES:
                for name, kwargs in MODES.items():
                    p = torch.nn.Parameter(torch.zeros(64, dtype=dtype))
                    _steps(cls([p], backend="numba", **kwargs), p, probe=name == "probe correction")
    calls = numba_backend.first_calls[before:]
    compiled = sum(c.compiled for c in calls)
    return (f"warm: numba kernels of {len(OPTIMIZERS)} optimizers x {len(MODES)} modes x fp32/bf16: {compiled} "
            f"compiled, {len(calls) - compiled} loaded from the cache, in {time.perf_counter() - start:.1f} s")
