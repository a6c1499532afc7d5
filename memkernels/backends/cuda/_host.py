"""The cuda backend's host side of an op call: the device-side pointer table and one launch.

Each call passes a device-side table of the tensors' pointers and sizes (api.h: param, grad, the op's states,
then grad_ref, origin, hvp, numel, chunk_begin, vec_ok); tables are cached while the data pointers stay the
same (backends/_device_tables.py), so a training loop uploads them once. With a `step_scalars` tensor the
kernel reads the per-step values on the device: once its table is cached a call neither syncs nor allocates,
so it can be captured in a CUDA graph (a table that a capture reads is kept for good).
"""
from __future__ import annotations

import ctypes
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from ...ops.spec import OpSpec
from .._device_tables import DeviceTables
from . import _abi

_DTYPE_CODES = {getattr(torch, name): code for name, code in _abi.DTYPE_CODES.items()}


class _Table(NamedTuple):
    rows: Tensor | None  # int64 [n_tensors, table_cols(n_states)] on the device; None when every tensor is empty
    n_tensors: int
    n_chunks: int


class PointerTables:
    """The launches' pointer tables, in the backends' shared cache (backends/_device_tables.py)."""

    def __init__(self, chunk_elems: int) -> None:
        self.chunk_elems = chunk_elems
        self.cache = DeviceTables("cuda")

    def get(self, device: torch.device, columns: Sequence[Sequence[Tensor]]) -> _Table:
        """columns: params, grads, the op's state lists, grad_refs, origins, hvps (an absent list is empty)."""
        n = len(columns[0])
        pointers = [[t.data_ptr() for t in col] if col else [0] * n for col in columns]
        sizes = [p.numel() for p in columns[0]]
        rows, (n_tensors, n_chunks) = self.cache.get(
            device, (*map(tuple, pointers), tuple(sizes)), lambda: self._build(pointers, sizes))
        return _Table(rows, n_tensors, n_chunks)

    def _build(self, pointers: list[list[int]], sizes: list[int]) -> tuple[Tensor | None, tuple[int, int]]:
        rows, chunk = [], 0
        for i, numel in enumerate(sizes):
            if numel == 0:
                continue
            ptrs = [col[i] for col in pointers]
            vec_ok = int(all(p % 16 == 0 for p in ptrs))
            rows.append([*ptrs, numel, chunk, vec_ok])
            chunk += -(-numel // self.chunk_elems)
        return (torch.tensor(rows, dtype=torch.int64) if rows else None), (len(rows), chunk)


def _scalar(t: Tensor | None, device: torch.device) -> tuple[int, int, Tensor | None]:
    """(data pointer, dtype code, the tensor kept alive) of grad_scale / found_inf on the device."""
    if t is None:
        return 0, 0, None
    if t.device != device or t.dtype not in _DTYPE_CODES:
        t = t.to(device=device, dtype=t.dtype if t.dtype in _DTYPE_CODES else torch.float32)
    return t.data_ptr(), _DTYPE_CODES[t.dtype], t


def _run(lib: _abi.Library, tables: PointerTables, op: str, params: list[Tensor], grads: list[Tensor],
         state_lists: Sequence[list[Tensor]], grad_refs: list[Tensor], diagnostics: Tensor | None, *,
         maximize: bool, update_grad_refs: bool, grad_scale: Tensor | None, found_inf: Tensor | None,
         origins: list[Tensor], hvps: list[Tensor], reuse_hvp: bool, probe: bool, probe_tau: Tensor | None,
         probe_norms: Tensor | None, step_scalars: Tensor | None = None, **scalars) -> None:
    """step_scalars: the op's spec.step_scalars on the device, read by the kernel in place of those floats;
    probe_tau (float64, on the device) is read there too: the probe's tau, or a step's hvp_scale = 1 / tau."""
    device = params[0].device
    stream = torch.cuda.current_stream(device)
    table = tables.get(device, [params, grads, *state_lists, grad_refs, origins, hvps])
    if table.n_chunks == 0:
        return  # only empty tensors: nothing changes and the diagnostics sums gain nothing
    scale_ptr, scale_dtype, _scale = _scalar(grad_scale, device)
    inf_ptr, inf_dtype, _inf = _scalar(found_inf, device)
    param_dtype = _DTYPE_CODES[params[0].dtype]
    if step_scalars is not None and not step_scalars.is_contiguous():
        step_scalars = step_scalars.contiguous()  # the kernel reads consecutive doubles
    states = _abi.MAX_STATES * ctypes.c_int64
    launch = _abi.Launch(
        table=table.rows.data_ptr(), n_tensors=table.n_tensors, n_chunks=table.n_chunks, device=device.index,
        stream=stream.cuda_stream, param_dtype=param_dtype,
        state_dtype=states(*(_DTYPE_CODES[s[0].dtype] if s else param_dtype for s in state_lists)),
        state_present=states(*(int(bool(s)) for s in state_lists)),
        ref_dtype=_DTYPE_CODES[grad_refs[0].dtype] if grad_refs else param_dtype,
        has_grad_refs=int(bool(grad_refs)), update_grad_refs=int(update_grad_refs), maximize=int(maximize),
        grad_scale=scale_ptr, grad_scale_dtype=scale_dtype, found_inf=inf_ptr, found_inf_dtype=inf_dtype,
        diagnostics=diagnostics.data_ptr() if diagnostics is not None else 0,
        step_scalars=step_scalars.data_ptr() if step_scalars is not None else 0,
        has_origins=int(bool(origins)), has_hvps=int(bool(hvps)),
        hvp_dtype=_DTYPE_CODES[hvps[0].dtype] if hvps else param_dtype, reuse_hvp=int(reuse_hvp), probe=int(probe),
        probe_tau=probe_tau.data_ptr() if probe_tau is not None else 0,
        probe_norms=probe_norms.data_ptr() if probe_norms is not None else 0)
    args_type = _abi.ARGS[op]
    args = args_type(**{name: scalars[name] for name, _ in args_type._fields_})
    lib.call(op, launch, args)


def kernel(spec: OpSpec, lib: _abi.Library, tables: PointerTables) -> Callable[..., None]:
    """The op's kernel, called as memkernels._ops calls every backend's: (params, grads, each state list,
    grad_refs, diagnostics, **scalars and modes)."""
    n = len(spec.states)

    def run(params, grads, *lists_and_diagnostics, **kw) -> None:
        _run(lib, tables, spec.name, params, grads, lists_and_diagnostics[:n], *lists_and_diagnostics[n:], **kw)
    return run
