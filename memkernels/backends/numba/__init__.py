"""The numba backend: fused steps of every op (memkernels/ops/) on CPU tensors, one parallel pass per op call.

host.py wraps each op (scalars, address tables, work lists, launch), kernels.py holds the one driver
kernel that serves every op and the probe pass, elements.py the per-element math mirroring the ops' reference math;
_dtypes, _penalty and _log1p are compiled into the kernels, _cache keeps them on disk and _fork says
whether this process may run them on threads. This module registers the ops where numba imports.
"""
from __future__ import annotations

import math

import torch

from ...ops import SPECS
from .. import register, register_count_adder, unavailable

try:
    import numba
    from . import _cache, _fork, host
except ImportError as exc:  # the registry reports the reason; auto falls back to the reference
    numba = None
    unavailable("numba", f"cannot import numba ({exc})")

if numba is None:
    first_calls: list = []  # nothing compiles without numba
else:
    from .host import add_one, first_calls

    for _name in SPECS:
        register("numba", _name, ("cpu",), prepares=True, stochastic_rounding=True, bf16_params=True)(host.OPS[_name])
    register_count_adder(add_one)
    adamw, lion, sgd = host.OPS["adamw"], host.OPS["lion"], host.OPS["sgd"]  # by name, for numba_status and tests


def numba_status() -> str:
    """For `memkernels info`: numba's version and threads, and what first calls cost in this process.

    Runs the fp32 AdamW fast path once on one element if no kernel has run yet,
    which shows whether the disk cache is warm (loading takes well under a second).
    """
    if numba is None:
        return "numba cannot be imported"
    if not first_calls:
        p = torch.zeros(1)
        adamw([p], [torch.zeros(1)], [torch.zeros(1)], [torch.zeros(1)], [], None, lr=1e-3, beta1=0.9,
              beta2=0.999, eps=1e-8, weight_decay=0.0, bias_correction1=0.1, bias_correction2=0.001,
              mean_age1=0.0, mean_age2=0.0, decoupled=True, eps_inside_sqrt=False, correction=0.0,
              correction_limit=math.inf, hvp_scale=0.0, maximize=False, memoryless=False, update_grad_refs=False,
              grad_scale=None, found_inf=None, origins=[], hvps=[], reuse_hvp=False, probe=False, probe_tau=0.0,
              probe_norms=None)
    compiled = [c for c in first_calls if c.compiled]
    loaded = [c for c in first_calls if not c.compiled]
    first = first_calls[0]
    root, why_off = _cache.state()
    threads = (f"{numba.get_num_threads()} threads ({numba.threading_layer()})" if _fork.threads_usable()
               else f"one thread: {_fork.single_thread_reason}")
    return (f"numba {numba.__version__}, {threads}; kernel cache {root or 'off: ' + why_off}; "
            f"first {first.kernel} kernel {'compiled' if first.compiled else 'loaded from the disk cache'} "
            f"in {first.seconds:.2f} s; this process compiled {len(compiled)} kernel(s) in "
            f"{sum(c.seconds for c in compiled):.1f} s and loaded {len(loaded)} from the cache in "
            f"{sum(c.seconds for c in loaded):.2f} s"
            + (f"; discarded {len(_cache.discarded)} unreadable cache file(s)" if _cache.discarded else ""))
