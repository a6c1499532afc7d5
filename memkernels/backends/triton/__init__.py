"""The Triton backend: fused multi-tensor kernels for CUDA tensors (CPU tensors under TRITON_INTERPRET=1).

This module only decides whether the backend can run here and, if it can, registers the kernels:
host.py launches one multi-tensor kernel (kernels.py) for every op of memkernels.ops, with the op's
per-element math from elements.py; _table.py keeps the pointer tables the kernel walks.
"""
from __future__ import annotations

import os

import torch

from .. import unavailable


def interpreting() -> bool:
    """TRITON_INTERPRET is set: Triton runs kernels in numpy on CPU tensors (read as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


def _why_not() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"cannot import triton ({exc}); install it with `pip install triton`"
    if not interpreting() and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors)"
    return None


_reason = _why_not()
if _reason is None:
    from . import host  # noqa: F401  (registers the kernels)
else:
    unavailable("triton", _reason)
