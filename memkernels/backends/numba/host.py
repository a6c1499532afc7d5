"""The numba backend's host side: one wrapper per op, generated from its spec, that launches its kernel.

The kernels (kernels.py) read and write the tensors' memory in place
through their data addresses: each call passes a table of addresses and a work
list of chunks, so the Python side does the same small work for 1 tensor or
150 (tables are cached while the addresses and sizes stay the same). A probe
call (probe=True) runs the op's probe kernel instead of its step kernel. Scalars
are rounded to the compute dtype here, once per call, exactly as torch rounds
reference.py's Python floats; the op's derived scalars come from its spec's
derive() (reference.py), as the reference's own math takes them. The first call
of each kernel compiles it, or loads it from numba's disk cache; first_calls
says how long that took.
"""
from __future__ import annotations

import functools
import time
from typing import Callable, NamedTuple

import numba
import numpy as np
import torch
from torch import Tensor

from ... import reference
from ...reference import NDIAG
from ...ops import SPECS, OpSpec
from .. import is_preparing
from . import kernels
from .elements import DIAG_SCALE, HOST_OPS, HostOp


class FirstCall(NamedTuple):
    """How long the first call of one kernel specialisation took, and whether it compiled."""

    kernel: str
    seconds: float
    compiled: bool


first_calls: list[FirstCall] = []


# Empty arrays that tell a kernel a list's dtype: half types travel as their bits (see _dtypes.py).
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


def _carriers(lists: tuple[list[Tensor], ...], params: list[Tensor]) -> tuple[np.ndarray, ...]:
    """Each list's dtype carrier; an absent list's is the params' (the kernel's flags leave it unread)."""
    return tuple(_DTYPE_CARRIERS[(lst or params)[0].dtype] for lst in lists)


def _state_carriers(state_lists: tuple[list[Tensor], ...]) -> tuple[np.ndarray | None, ...]:
    """Each state list's dtype carrier; None for an absent one, which the kernel leaves out by its type."""
    return tuple(_DTYPE_CARRIERS[lst[0].dtype] if lst else None for lst in state_lists)


def _compute_dtype(p: Tensor) -> type:
    return np.float64 if p.dtype == torch.float64 else np.float32


def _inv_scale(grad_scale: Tensor | None, maximize: bool) -> float:
    """reference.load_grad's factor with the maximize sign folded in."""
    factor = reference.inv_scale(grad_scale)
    return -factor if maximize else factor


def _rounded(scalars: NamedTuple, dtype: type) -> NamedTuple:
    """The scalars in the compute dtype; one past its range becomes Inf, as torch rounds a Python scalar."""
    with np.errstate(over="ignore"):
        return type(scalars)(*map(dtype, scalars))


def _specialisation(arg) -> object:
    """What of a kernel argument picks its compiled specialisation: its dtype, each item's for a tuple."""
    if isinstance(arg, tuple):
        return tuple(map(_specialisation, arg))
    return None if arg is None else arg.dtype


_launched: set[tuple] = set()  # (kernel, argument dtypes) already timed


def _launch(kernel: Callable, name: str, *args) -> None:
    """Run a kernel (inside backends.preparing(): only build it). A specialisation's first use compiles it or
    loads it from the cache, apart from its run, and records how long that took."""
    key = (kernel, *map(_specialisation, args[:-1]))
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


_NO_KEYS = np.zeros((0, 0), np.int64)  # a call that rounds to nearest: its kernel never reads keys


def _run(kernel: Callable, name: str, lists: tuple[list[Tensor], ...], carriers: tuple, numels: tuple[int, ...],
         out: Tensor | None, scalars, keys: np.ndarray | None = None) -> None:
    """One kernel call for all tensors of `lists` (params first, of numels elements, and the lists' dtype
    carriers); the chunks' sums (diagnostics or probe norms) are added to `out` in work order. keys: a step's
    rounding keys, for a stochastic kernel (a probe kernel takes none)."""
    work = _work_list(numels)
    if work.shape[0] == 0:
        return
    addresses = _address_table(tuple(tuple(t.data_ptr() for t in lst) for lst in lists), len(lists[0]))
    sums = np.zeros((work.shape[0], out.numel()) if out is not None else (0, NDIAG))
    key_table = () if keys is None else (keys,)
    _launch(kernel, name, addresses, *key_table, work, *carriers, sums, scalars)
    if out is not None and not is_preparing():
        out.add_(torch.from_numpy(sums.sum(axis=0)).to(out.device))


# A probe pass streams origins, and the step after it params (outputs they only write: see kernels.py),
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


def _step_or_probe(op: str, flags: tuple[bool, ...], direction_flags: tuple[bool, ...], params, grads, state_lists,
                   grad_refs, diagnostics, scalars, *, correction, update_grad_refs, origins, hvps, reuse_hvp, probe,
                   probe_norms, inv_scale, rounding_keys, compensations, param_rounding) -> None:
    """The op's probe pass (probe) or step: its kernel for these flags, on these lists."""
    scaled = inv_scale != 1.0
    numels = tuple(p.numel() for p in params)
    if probe:
        kernel = kernels.probe_kernel(op, direction_flags, scaled, probe_norms is not None, _streams(numels, params))
        lists = (params, grads, origins)
        _run(kernel, f"{op} probe", lists, _carriers(lists, params), numels, probe_norms, scalars)
        return
    has_ref = bool(grad_refs)
    kernel = kernels.step_kernel(op, flags, correction != 0.0, bool(origins), has_ref, has_ref and update_grad_refs,
                                 reuse_hvp, bool(hvps) and not reuse_hvp, diagnostics is not None, scaled,
                                 bool(origins) and _streams(numels, params), rounding_keys is not None,
                                 *_param_write(compensations, param_rounding))
    carriers = (*_carriers((params, grads), params), _state_carriers(state_lists),
                *_carriers((grad_refs, origins, hvps), params))
    keys = _NO_KEYS if rounding_keys is None else np.ascontiguousarray(rounding_keys.numpy())
    lists = (params, grads, *state_lists, grad_refs, origins, hvps, *((compensations,) if compensations else ()))
    _run(kernel, op, lists, carriers, numels, diagnostics, scalars, keys)


def _param_write(compensations: list[Tensor], param_rounding: str) -> tuple[bool, ...]:
    """The step kernel's flags kahan and stochastic_params; none where both are off, so the kernel of that call
    is the one of before (the same cache entry)."""
    if compensations:
        return (True, False)
    return (False, True) if param_rounding == "stochastic" else ()


def host_op(spec: OpSpec, part: HostOp) -> Callable[..., None]:
    """The op's wrapper, called as the registry calls a kernel: (params, grads, *the spec's state lists,
    grad_refs, diagnostics, **its scalars and modes)."""
    n_states = len(spec.states)

    def op(params, grads, *lists, maximize, update_grad_refs, grad_scale, found_inf, origins, hvps, reuse_hvp,
           probe, probe_norms, rounding_keys=None, compensations=(), param_rounding="nearest", **k) -> None:
        state_lists, (grad_refs, diagnostics) = lists[:n_states], lists[n_states:]
        if _skipped(found_inf):
            return
        inv_scale = _inv_scale(grad_scale, maximize)
        dtype = _compute_dtype(params[0])
        d = spec.derive(**k)
        common = dict(zero=0.0, one=1.0, inv_scale=inv_scale, ref_inv_scale=1.0 if update_grad_refs else inv_scale,
                      lr=k["lr"], hvp_scale=k["hvp_scale"], correction_lr2=d["correction_lr2"], tau=k["probe_tau"],
                      diag_scale=DIAG_SCALE, diag_lr=k["lr"] * DIAG_SCALE)
        flags, direction_flags = part.flags(k, state_lists)
        _step_or_probe(spec.name, flags, direction_flags, params, grads, state_lists, grad_refs, diagnostics,
                       _rounded(part.scalars(k, d, common, dtype), dtype), correction=k["correction"],
                       update_grad_refs=update_grad_refs, origins=origins, hvps=hvps, reuse_hvp=reuse_hvp,
                       probe=probe, probe_norms=probe_norms, inv_scale=inv_scale, rounding_keys=rounding_keys,
                       compensations=compensations, param_rounding=param_rounding)

    op.__name__ = op.__qualname__ = spec.name
    return op


OPS = {name: host_op(spec, HOST_OPS[name]) for name, spec in SPECS.items()}


def add_one(counts: list[Tensor]) -> bool:
    """+1 on every count in one call, if all are CPU float32 scalars; False (nothing done) otherwise.

    torch's foreach add on CPU tensors dispatches once per tensor (~1.6 us each: a quarter of the
    host time of a step on 150 small tensors); this is one call.
    """
    if not all(t.dtype == torch.float32 and t.is_cpu and t.numel() == 1 for t in counts):
        return False
    kernels.add_one_kernel()(np.fromiter((t.data_ptr() for t in counts), np.int64, len(counts)),
                             _DTYPE_CARRIERS[torch.float32])
    return True
