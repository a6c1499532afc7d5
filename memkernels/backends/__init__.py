"""Backend registry: each backend module registers one kernel per (op, device type).

The ops in memkernels._ops validate their arguments, then call resolve() to
find the kernel. "auto" takes the first available backend of PREFERENCE for the
tensors' device type; a faster backend that is present but cannot load is
reported once as a warning and in `memkernels info`, never skipped silently.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
import time
import warnings
from typing import Callable, Iterator

import torch

PREFERENCE = {"cpu": ("numba", "reference"), "cuda": ("cuda", "triton", "reference")}
BACKENDS = ("reference", "numba", "triton", "cuda")

_kernels: dict[tuple[str, str, str], Callable] = {}
_status: dict[str, str] = {}  # backend -> "available (...)" or the reason it is not
_warned: set[str | tuple[str, str]] = set()  # backends skipped with a warning (and why, when not the status)
_preparing = threading.local()
_count_adder: Callable[[list], bool] | None = None  # register_count_adder


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run here; the message says why."""


def register(backend: str, op: str, device_types: tuple[str, ...], *, device_step_scalars: bool = False,
             prepares: bool = False, stochastic_rounding: bool = False,
             bf16_params: bool = False) -> Callable[[Callable], Callable]:
    """device_step_scalars: the kernel takes `step_scalars` and reads it on the device (no host sync);
    other kernels get its values as floats, which memkernels._ops reads on the host.
    prepares: called inside preparing(), the kernel compiles or loads what the call needs and writes nothing;
    the ops do not call other kernels there.
    stochastic_rounding: the kernel takes `rounding_keys` and rounds its bfloat16 writes by them; the ops refuse
    a stochastic call to other kernels, and "auto" passes them over for one.
    bf16_params: the kernel takes `compensations` and `param_rounding` and writes bfloat16 params by them (Kahan's
    compensated write, or stochastic rounding under the params' keys); likewise refused and passed over."""
    def deco(fn: Callable) -> Callable:
        fn.device_step_scalars = device_step_scalars
        fn.prepares = prepares
        fn.stochastic_rounding = stochastic_rounding
        fn.bf16_params = bf16_params
        for device_type in device_types:
            _kernels[(op, backend, device_type)] = fn
        return fn
    return deco


@contextlib.contextmanager
def preparing() -> Iterator[None]:
    """Op calls inside check, resolve and build their kernels (compile, or load from a cache) but change no
    tensor: an optimizer step prepares every call before its first write (docs/DESIGN.md, a step is all or
    nothing)."""
    before = is_preparing()
    _preparing.on = True
    try:
        yield
    finally:
        _preparing.on = before


def is_preparing() -> bool:
    return getattr(_preparing, "on", False)


def has_kernel(op: str, backend: str, device_type: str) -> bool:
    return (op, backend, device_type) in _kernels


def unavailable(backend: str, reason: str) -> None:
    """Called by a backend module that imports but cannot run (no GPU, no compiler...)."""
    _status[backend] = "unavailable: " + reason


def load(backend: str) -> str:
    """Import a backend module once; return its status line."""
    if backend not in _status:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        module = f"{__name__}.{backend}"
        if importlib.util.find_spec(module) is None:
            _status[backend] = "unavailable: not part of this version"
        else:
            start = time.perf_counter()
            try:
                importlib.import_module(module)
            except Exception as exc:  # the reason is reported, not swallowed
                _status[backend] = f"unavailable: {type(exc).__name__}: {exc}"
            else:
                _status.setdefault(backend, f"available (import {time.perf_counter() - start:.2f} s)")
    return _status[backend]


def status() -> dict[str, str]:
    return {name: load(name) for name in BACKENDS}


def requested(backend: str) -> str:
    """The argument, or MEMKERNELS_BACKEND when the argument is "auto"."""
    if backend == "auto":
        backend = os.environ.get("MEMKERNELS_BACKEND", "auto")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return backend


def register_count_adder(add: Callable[[list], bool]) -> None:
    """A backend's one-call +1 on the optimizers' step counts: it adds to the counts it can take (numba's: CPU
    float32 scalars, where torch's foreach add dispatches once per tensor) and returns True, or changes
    nothing and returns False."""
    global _count_adder
    _count_adder = add


def add_one(counts: list) -> None:
    """+1 on step counts: through the registered count adder where it takes them, else torch's foreach add."""
    if _count_adder is None or not _count_adder(counts):
        torch._foreach_add_(counts, 1.0)


def resolve(op: str, backend: str, device_type: str, *, stochastic: bool = False,
            bf16_params: bool = False) -> tuple[str, Callable]:
    """The backend and kernel that run op on device_type tensors. stochastic: the call rounds bfloat16 writes
    stochastically; bf16_params: it writes bfloat16 params compensated (Kahan) or stochastically. "auto" gives
    such a call only to a kernel that can (a warning names each one passed over)."""
    backend = requested(backend)
    if backend != "auto":
        state = load(backend)
        kernel = _kernels.get((op, backend, device_type))
        if kernel is None:
            why = state if not state.startswith("available") else f"it has no kernel for {device_type} tensors"
            raise BackendUnavailable(f"backend {backend!r} cannot run {op} on {device_type}: {why}")
        return backend, kernel
    for name in PREFERENCE.get(device_type, ("reference",)):
        state = load(name)
        kernel = _kernels.get((op, name, device_type))
        missing = None if kernel is None else (
            "kahan / stochastic parameter rounding" if bf16_params and not kernel.bf16_params else
            "stochastic rounding of bf16 states" if stochastic and not kernel.stochastic_rounding else None)
        if missing is not None:
            if (name, missing) not in _warned:
                _warned.add((name, missing))
                warnings.warn(f"memkernels: backend {name!r} skipped on {device_type}: {missing} is not implemented "
                              "there yet", RuntimeWarning, stacklevel=4)
            continue
        if kernel is not None:
            return name, kernel
        if name != "reference" and not state.endswith("not part of this version") and name not in _warned:
            _warned.add(name)
            warnings.warn(f"memkernels: backend {name!r} skipped on {device_type} ({state}); "
                          "see `memkernels info`", RuntimeWarning, stacklevel=4)
    raise BackendUnavailable(f"no memkernels backend can run {op} on {device_type} tensors")
