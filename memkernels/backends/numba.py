"""The numba backend: fused AdamW, Lion and SGD steps on CPU tensors, one parallel pass per op call.

The kernels (_numba_kernels.py) read and write the tensors' memory in place
through their data addresses: each call passes a table of addresses and a work
list of chunks, so the Python side does the same small work for 1 tensor or
150 (tables are cached while the addresses and sizes stay the same). A probe
call (probe=True) runs the op's probe kernel instead of its step kernel. Scalars
are rounded to the compute dtype here, once per call, exactly as torch rounds
reference.py's Python floats. The first call of each kernel compiles it, or
loads it from numba's disk cache; numba_status() says how long that took.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .. import reference
from ..reference import NDIAG
from . import is_preparing, register, register_count_adder, unavailable

try:
    import numba
    from . import _numba_cache
    from . import _numba_kernels as kernels
    from . import _numba_fork
    from ._numba_math import DIAG_SCALE, AdamWScalars, LionScalars, SGDScalars
except ImportError as exc:  # the registry reports the reason; auto falls back to the reference
    numba = None
    unavailable("numba", f"cannot import numba ({exc})")


class FirstCall(NamedTuple):
    """How long the first call of one kernel specialisation took, and whether it compiled."""

    kernel: str
    seconds: float
    compiled: bool


first_calls: list[FirstCall] = []


# Empty arrays that tell a kernel a list's dtype: half types travel as their bits (see _numba_dtypes.py).
_DTYPE_CARRIERS = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64),
                   torch.bfloat16: np.empty(0, np.uint16), torch.float16: np.empty(0, np.int16)}
_TABLE_CACHE = 64  # tables kept per kind: a few optimizers x param groups x dtypes


@functools.lru_cache(maxsize=_TABLE_CACHE)
def _address_table(addresses: tuple[tuple[int, ...], ...], n: int) -> np.ndarray:
    """int64 [n, lists]: each tensor's data address in each list, 0 for an absent (empty) list.

    Cached under the addresses themselves, so a cached table is valid by construction.
    """
    table = np.zeros((n, len(addresses)), np.int64)
    for j, column in enumerate(addresses):
        if column:
            table[:, j] = column
    return table


@functools.lru_cache(maxsize=_TABLE_CACHE)
def _work_list(numels: tuple[int, ...]) -> np.ndarray:
    """int64 [chunks, 3]: (tensor, first element, count) of every chunk of CHUNK elements; none for empty tensors."""
    sizes = np.array(numels, np.int64)
    counts = -(-sizes // kernels.CHUNK)
    rows = np.repeat(np.arange(len(numels), dtype=np.int64), counts)
    starts = (np.arange(rows.size, dtype=np.int64) - (np.cumsum(counts) - counts)[rows]) * kernels.CHUNK
    return np.ascontiguousarray(np.stack((rows, starts, np.minimum(sizes[rows] - starts, kernels.CHUNK)), axis=1))


def _compute_dtype(p: Tensor) -> type:
    return np.float64 if p.dtype == torch.float64 else np.float32


def _inv_scale(grad_scale: Tensor | None, maximize: bool) -> float:
    """reference.load_grad's factor with the maximize sign folded in."""
    factor = reference.inv_scale(grad_scale)
    return -factor if maximize else factor


def _reciprocal(x: float) -> float:
    """1 / x, with 1 / 0 = inf signed like 0 (as the division it stands for gives in the kernel)."""
    return 1.0 / x if x != 0.0 else math.copysign(math.inf, x)


def _rounded(scalars: NamedTuple, dtype: type) -> NamedTuple:
    """The scalars in the compute dtype; one past its range becomes Inf, as torch rounds a Python scalar."""
    with np.errstate(over="ignore"):
        return type(scalars)(*map(dtype, scalars))


_launched: set[tuple] = set()  # (kernel, argument dtypes) already timed


def _launch(kernel: Callable, name: str, *args) -> None:
    """Run a kernel (inside backends.preparing(): only build it). A specialisation's first use compiles it or
    loads it from the cache, apart from its run, and records how long that took."""
    key = (kernel, *(a.dtype for a in args[:-1]))
    if key not in _launched:
        before, hits = len(kernel.overloads), sum(kernel.stats.cache_hits.values())
        start = time.perf_counter()
        kernel.compile(tuple(numba.typeof(a) for a in args))
        if len(kernel.overloads) > before:
            compiled = sum(kernel.stats.cache_hits.values()) == hits
            first_calls.append(FirstCall(name, time.perf_counter() - start, compiled))
        _launched.add(key)
    if not is_preparing():
        kernel(*args)


def _run(kernel: Callable, name: str, lists: tuple[list[Tensor], ...], numels: tuple[int, ...], out: Tensor | None,
         scalars) -> None:
    """One kernel call for all tensors of `lists` (params first, of numels elements); the chunks' sums
    (diagnostics or probe norms) are added to `out` in work order."""
    params = lists[0]
    work = _work_list(numels)
    if work.shape[0] == 0:
        return
    addresses = _address_table(tuple(tuple(t.data_ptr() for t in lst) for lst in lists), len(params))
    carriers = [_DTYPE_CARRIERS[(lst or params)[0].dtype] for lst in lists]
    sums = np.zeros((work.shape[0], out.numel()) if out is not None else (0, NDIAG))
    _launch(kernel, name, addresses, work, *carriers, sums, scalars)
    if out is not None and not is_preparing():
        out.add_(torch.from_numpy(sums.sum(axis=0)).to(out.device))


# A probe pass streams origins, and the step after it params (outputs they only write: see _numba_kernels.py),
# in calls with at least this many bytes of params: there the lines they write leave the cache before the next
# pass reads them, and streaming saves their write-allocate reads. Probe pass + step in paired rounds on a
# 2-core Zen 4 with a 32 MiB L3: 6% faster at 4M fp32 params, 7-10% at 8M-64M and on GPT-2 small's 124M, the
# same at 2M, and 12-21% slower at 1M, where back-to-back passes find plainly written lines still in the L3.
STREAM_MIN_BYTES = 16 << 20


def _streams(numels: tuple[int, ...], params: list[Tensor]) -> bool:
    return sum(numels) * params[0].element_size() >= STREAM_MIN_BYTES


def _skipped(found_inf: Tensor | None) -> bool:
    """AMP found an inf: the step changes nothing, as torch's fused optimizers do."""
    return found_inf is not None and found_inf.item() != 0.0


def _step_or_probe(op: str, factory: Callable, op_flags: tuple[bool, ...], direction_flags: tuple[bool, ...],
                   params, grads, state_lists, grad_refs, diagnostics, scalars, *, correction, update_grad_refs,
                   origins, hvps, reuse_hvp, probe, probe_norms, inv_scale) -> None:
    """The op's probe pass (probe) or step: its kernel for these flags, on these lists.

    The op functions below pass the step's modes (origins, hvps, reuse_hvp, probe, probe_norms) on as they come.
    """
    scaled = inv_scale != 1.0
    numels = tuple(p.numel() for p in params)
    if probe:
        kernel = kernels.probe_kernel(op, direction_flags, scaled, probe_norms is not None, _streams(numels, params))
        _run(kernel, f"{op} probe", (params, grads, origins), numels, probe_norms, scalars)
        return
    has_ref = bool(grad_refs)
    kernel = factory(*op_flags, correction != 0.0, bool(origins), has_ref, has_ref and update_grad_refs, reuse_hvp,
                     bool(hvps) and not reuse_hvp, diagnostics is not None, scaled,
                     bool(origins) and _streams(numels, params))
    _run(kernel, op, (params, grads, *state_lists, grad_refs, origins, hvps), numels, diagnostics, scalars)


def adamw(params, grads, exp_avgs, exp_avg_sqs, grad_refs, diagnostics, *, lr, beta1, beta2, eps,
          weight_decay, bias_correction1, bias_correction2, mean_age1, mean_age2, decoupled,
          eps_inside_sqrt, correction, correction_limit, hvp_scale, maximize, memoryless, update_grad_refs,
          grad_scale, found_inf, probe_tau, **modes) -> None:
    if _skipped(found_inf):
        return
    inv_scale = _inv_scale(grad_scale, maximize)
    dtype = _compute_dtype(params[0])
    scalars = AdamWScalars(
        zero=0.0, one=1.0, inv_scale=inv_scale, ref_inv_scale=1.0 if update_grad_refs else inv_scale,
        lr=lr, one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2, eps=eps,
        weight_decay=weight_decay, bias_correction1=bias_correction1, inv_eps=_reciprocal(eps),
        bias_correction2=bias_correction2, inv_sqrt_bias_correction2=_reciprocal(bias_correction2 ** 0.5),
        mean_age1=mean_age1, mean_age2=mean_age2, hvp_scale=hvp_scale,
        shrink=1 - lr * weight_decay if decoupled else 1.0, step_size=lr if memoryless else lr / bias_correction1,
        correction_lr2=correction * lr * lr, kappa_lr=correction_limit * lr / DIAG_SCALE, tau=probe_tau,
        diag_scale=DIAG_SCALE, diag_lr=lr * DIAG_SCALE, diag_weight_decay=weight_decay * DIAG_SCALE,
        diag_inv_bias_correction1=_reciprocal(bias_correction1) * DIAG_SCALE,
        penalty_limit=float(np.finfo(dtype).max) / 4)
    _step_or_probe("adamw", kernels.adamw_kernel, (decoupled, eps_inside_sqrt, memoryless),
                   (decoupled, eps_inside_sqrt), params, grads, (exp_avgs, exp_avg_sqs), grad_refs, diagnostics,
                   _rounded(scalars, dtype), correction=correction, update_grad_refs=update_grad_refs,
                   inv_scale=inv_scale, **modes)


def lion(params, grads, exp_avgs, grad_refs, diagnostics, *, lr, beta1, beta2, weight_decay, smoothing,
         ema_weight, age_weight, correction, correction_limit, hvp_scale, maximize, memoryless, update_grad_refs,
         grad_scale, found_inf, probe_tau, **modes) -> None:
    if _skipped(found_inf):
        return
    inv_scale = _inv_scale(grad_scale, maximize)
    scalars = LionScalars(
        zero=0.0, one=1.0, inv_scale=inv_scale, ref_inv_scale=1.0 if update_grad_refs else inv_scale,
        lr=lr, beta1=beta1, one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
        weight_decay=weight_decay, smoothing=smoothing, ema_weight=ema_weight, age_weight=age_weight,
        hvp_scale=hvp_scale, shrink=1 - lr * weight_decay, correction_lr2=correction * lr * lr,
        kappa_lr=correction_limit * lr / DIAG_SCALE, tau=probe_tau,
        diag_scale=DIAG_SCALE, diag_lr=lr * DIAG_SCALE, diag_weight_decay=weight_decay * DIAG_SCALE)
    _step_or_probe("lion", kernels.lion_kernel, (smoothing != 0.0, memoryless), (smoothing != 0.0,), params, grads,
                   (exp_avgs,), grad_refs, diagnostics, _rounded(scalars, _compute_dtype(params[0])),
                   correction=correction, update_grad_refs=update_grad_refs, inv_scale=inv_scale, **modes)


def sgd(params, grads, momentum_buffers, grad_refs, diagnostics, *, lr, momentum, weight_decay, nesterov,
        update_scale, memory_coef, correction, correction_limit, hvp_scale, maximize, memoryless, update_grad_refs,
        grad_scale, found_inf, probe_tau, **modes) -> None:
    if _skipped(found_inf):
        return
    inv_scale = _inv_scale(grad_scale, maximize)
    scalars = SGDScalars(
        zero=0.0, one=1.0, half=0.5, inv_scale=inv_scale, ref_inv_scale=1.0 if update_grad_refs else inv_scale,
        lr=lr, momentum=momentum, weight_decay=weight_decay, update_scale=update_scale,
        memory_coef=memory_coef, hvp_scale=hvp_scale, correction_lr2=correction * lr * lr,
        kappa_lr=correction_limit * lr, tau=probe_tau, diag_scale=DIAG_SCALE, diag_lr=lr * DIAG_SCALE)
    _step_or_probe("sgd", kernels.sgd_kernel, (bool(momentum_buffers), nesterov, memoryless), (), params, grads,
                   (momentum_buffers,), grad_refs, diagnostics, _rounded(scalars, _compute_dtype(params[0])),
                   correction=correction, update_grad_refs=update_grad_refs, inv_scale=inv_scale, **modes)


def add_one(counts: list[Tensor]) -> bool:
    """+1 on every count in one call, if all are CPU float32 scalars; False (nothing done) otherwise.

    torch's foreach add on CPU tensors dispatches once per tensor (~1.6 us each: a quarter of the
    host time of a step on 150 small tensors); this is one call.
    """
    if numba is None or not all(t.dtype == torch.float32 and t.is_cpu and t.numel() == 1 for t in counts):
        return False
    kernels.add_one_kernel()(np.fromiter((t.data_ptr() for t in counts), np.int64, len(counts)),
                             _DTYPE_CARRIERS[torch.float32])
    return True


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
    root, why_off = _numba_cache.state()
    threads = (f"{numba.get_num_threads()} threads ({numba.threading_layer()})" if _numba_fork.threads_usable()
               else f"one thread: {_numba_fork.single_thread_reason}")
    return (f"numba {numba.__version__}, {threads}; kernel cache {root or 'off: ' + why_off}; "
            f"first {first.kernel} kernel {'compiled' if first.compiled else 'loaded from the disk cache'} "
            f"in {first.seconds:.2f} s; this process compiled {len(compiled)} kernel(s) in "
            f"{sum(c.seconds for c in compiled):.1f} s and loaded {len(loaded)} from the cache in "
            f"{sum(c.seconds for c in loaded):.2f} s"
            + (f"; discarded {len(_numba_cache.discarded)} unreadable cache file(s)" if _numba_cache.discarded
               else ""))


if numba is not None:
    register("numba", "adamw", ("cpu",), prepares=True)(adamw)
    register("numba", "lion", ("cpu",), prepares=True)(lion)
    register("numba", "sgd", ("cpu",), prepares=True)(sgd)
    register_count_adder(add_one)
