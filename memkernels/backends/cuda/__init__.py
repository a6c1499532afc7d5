"""The CUDA C++ backend: libmemkernels_cuda.so (csrc/) through ctypes, one launch per op call.

Importing it decides whether it can run here and, if it can, registers a kernel for every op of
memkernels/ops/. The library is found, or built once when nvcc is there, by _cache (with _build, which
generates each op's part of the C ABI from its spec), loaded by _abi (which refuses one built from other
headers or another spec) and called by _host.
"""
from __future__ import annotations

import torch

from ...ops import SPECS
from .. import register, unavailable
from . import _abi, _cache, _host


def _load() -> tuple[_abi.Library | None, str]:
    """The library, or None and why the backend cannot run here."""
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA device (torch.cuda.is_available() is False)"
    path, how = _cache.locate()
    if path is None:
        return None, how
    try:
        return _abi.Library(path), how
    except (OSError, _abi.AbiMismatch) as exc:
        return None, f"cannot load {path}: {exc}"


_LIB, LIBRARY_ORIGIN = _load()
if _LIB is None:
    unavailable("cuda", LIBRARY_ORIGIN)
else:
    _TABLES = _host.PointerTables(_LIB.chunk_elems)
    for _spec in SPECS.values():
        register("cuda", _spec.name, ("cuda",), device_step_scalars=True)(_host.kernel(_spec, _LIB, _TABLES))
