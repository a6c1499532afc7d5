"""Host side of the Triton backend: one wrapper for every op of memkernels.ops, one launch per op call.

The kernel takes the op's fp32 scalars as two namedtuples (elements.py): `s`, the static ones, and `n`,
this step's. The scalars that reference.py derives in Python (1 - beta1, lr / bias_correction1,
1 - lr * weight_decay, correction * lr * lr, ...) come from the op's derive() in float64, and the
launch rounds each to fp32 exactly as torch rounds a Python scalar against an fp32 tensor.
grad_scale, found_inf and probe_tau stay on the device: the kernel reads them, so a step never syncs
the host. So do rounding_keys: a stochastic step's kernel reads each tensor's keys from them, and one
compiled variant serves every key.

With a `step_scalars` tensor the per-step floats are placeholders: `n` holds zeros, which the kernel
replaces by the op's derivation on the device from the tensor, so only the static scalars and flags
(betas, eps, weight_decay, correction, ...) are taken from the floats, and no step value picks a code
path.
"""
from __future__ import annotations

import contextlib
import functools
from collections import namedtuple
from typing import Any, Sequence

import torch
import triton.language as tl
from torch import Tensor

from ...ops import SPECS, OpSpec
from .. import register
from . import elements, interpreting, kernels
from ._table import block_map, pointer_table

BLOCK = 1024  # elements per program (one tile)
NUM_WARPS = 4  # 128 threads: 8 fp32 elements, two 16-byte vectors per array, per thread

# CPU tensors only under the interpreter: compiled kernels would dereference host addresses on the GPU.
DEVICE_TYPES = ("cpu", "cuda") if interpreting() else ("cuda",)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64}


def _check_device(op: str, params: Sequence[Tensor]) -> torch.device:
    p = params[0]
    if p.dtype == torch.float64:
        raise TypeError(f"memkernels.{op}_: the triton backend computes in fp32 and does not take float64 "
                        "params; use backend='reference' (or 'numba' on CPU) for float64")
    if interpreting() and p.device.type != "cpu":
        raise RuntimeError(f"memkernels.{op}_: TRITON_INTERPRET=1 runs Triton on the CPU, which cannot read "
                           f"the device addresses of {p.device} tensors; unset it to run on {p.device}")
    return p.device


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


def _dtype(lst: Sequence[Tensor], fallback: Tensor) -> tl.dtype:
    return _TL_DTYPES[(lst[0] if lst else fallback).dtype]


@functools.cache
def _record(name: str, fields: tuple[str, ...]) -> type:
    """The namedtuple type of a kernel argument, one per name and fields (the kernel's cache key names it)."""
    return namedtuple(name, fields)


def _scalars(spec: OpSpec, op: elements.Op, scalars: dict[str, Any], on_device: bool) -> tuple[tuple, tuple]:
    """The kernel's (s, n): the op's static float scalars with the values derive() computes from them alone, and
    the per-step ones (op.per_step) with those derived from them. on_device: n is zeros, replaced on the device,
    and derive() runs on ones in place of the step scalars, for the static values only."""
    values = dict(scalars, **dict.fromkeys(spec.step_scalars, 1.0)) if on_device else scalars
    derived = spec.derive(**values)
    values = {**values, **derived}
    per_step = op.per_step._fields
    n = op.per_step(*(0.0,) * len(per_step)) if on_device else op.per_step(*(values[k] for k in per_step))
    names = tuple(k for k in (*(x.name for x in spec.scalars if x.bounds is not None), *derived)
                  if k not in per_step)
    return _record(f"{spec.name}_static", names)(*(values[k] for k in names)), n


def _flags(spec: OpSpec, op: elements.Op, scalars: dict[str, Any]) -> tuple:
    """FLAGS: the spec's bool flags, and the op's flags selected by its scalars."""
    flags = {x.name: bool(scalars[x.name]) for x in spec.scalars if x.bounds is None}
    if op.flags is not None:
        flags.update(op.flags(**scalars))
    return _record(f"{spec.name}_flags", tuple(flags))(**flags)


def launch(spec: OpSpec, params: Sequence[Tensor], grads: Sequence[Tensor], *lists: Any,
           step_scalars: Tensor | None = None, correction: float, correction_limit: float, hvp_scale: float,
           maximize: bool, memoryless: bool, update_grad_refs: bool, grad_scale: Tensor | None,
           found_inf: Tensor | None, origins: Sequence[Tensor], hvps: Sequence[Tensor], reuse_hvp: bool,
           probe: bool, probe_tau: Tensor | None, probe_norms: Tensor | None, rounding_keys: Tensor | None = None,
           compensations: Sequence[Tensor] = (), param_rounding: str = "nearest", **scalars: Any) -> None:
    """The op's kernel: one launch over every tensor of the call. lists: the op's state lists, grad_refs and
    diagnostics, as the op passes them; the table's columns are params, grads, the states, grad_refs, origins
    and hvps (and a step's compensations). rounding_keys: a stochastic step's keys (memkernels._ops), None to
    round to nearest."""
    *state_lists, grad_refs, diagnostics = lists
    device = _check_device(spec.name, params)
    numels = [p.numel() for p in params]
    blocks = block_map(numels, BLOCK, device)
    if blocks.numel() == 0:
        return  # every tensor is empty
    kahan = bool(compensations) and not probe
    columns = (params, grads, *state_lists, grad_refs, origins, hvps, *((compensations,) if kahan else ()))
    table, aligned = pointer_table(columns, numels, device)
    grad_scale, found_inf = _on(grad_scale, device), _on(found_inf, device)
    if step_scalars is not None and not step_scalars.is_contiguous():
        step_scalars = step_scalars.contiguous()  # the kernel reads consecutive float64s
    if rounding_keys is not None and not rounding_keys.is_contiguous():
        rounding_keys = rounding_keys.contiguous()  # the kernel reads row-major int64s
    op = elements.OPS[spec.name]
    p = params[0]
    s, n = _scalars(spec, op, dict(scalars, correction=correction, correction_limit=correction_limit,
                                   hvp_scale=hvp_scale, memoryless=memoryless), step_scalars is not None)
    states = tuple((2 + i, _dtype(lst, p)) for i, lst in enumerate(state_lists) if lst)
    pointers = (diagnostics, grad_scale, found_inf, step_scalars, probe_tau, probe_norms, rounding_keys)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:  # Triton launches on the current device's current stream
        kernels.multi_tensor_kernel[(blocks.numel() // 2,)](
            table, blocks, *(blocks if t is None else t for t in pointers),  # blocks stands in for absent tensors
            s, n, scalars.get("weight_decay", 0.0), correction, correction_limit, STEP=op.step,
            DIRECTION=op.direction, DERIVED=op.derived, FLAGS=_flags(spec, op, scalars), STATES=states,
            NSTEP=len(spec.step_scalars), DEVICE_SCALARS=step_scalars is not None, P=_dtype(params, p),
            R=_dtype(grad_refs, p), H=_dtype(hvps, p), HAS_REF=bool(grad_refs), UPDATE_REFS=update_grad_refs,
            HAS_ORIGIN=bool(origins), STORE_HVP=bool(hvps) and not reuse_hvp, REUSE_HVP=reuse_hvp, PROBE=probe,
            HAS_TAU=probe_tau is not None, NORMS=probe_norms is not None, DIAG=diagnostics is not None,
            MEMORYLESS=memoryless, CORRECTION=correction != 0.0, MAXIMIZE=maximize,
            HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None, ALIGNED=aligned,
            SOFT_BF16=interpreting(), STOCHASTIC=rounding_keys is not None, KAHAN=kahan,
            STOCHASTIC_PARAMS=param_rounding == "stochastic" and not probe, NCOL=len(columns) + 1, BLOCK=BLOCK,
            num_warps=NUM_WARPS, enable_fp_fusion=False)  # no FMA contraction: the reference's rounding


def _check_order(spec: OpSpec, op: elements.Op) -> None:
    """The device derivation takes the step_scalars tensor's values as its first parameters, by position."""
    taken = tuple(op.derived.arg_names[:len(spec.step_scalars)])
    if taken != spec.step_scalars:
        raise RuntimeError(f"triton elements.{op.derived.__name__} takes {taken} where the spec's step scalars "
                           f"are {spec.step_scalars}")


for _spec in SPECS.values():
    if _spec.name not in elements.OPS:
        raise RuntimeError(f"the op {_spec.name!r} of memkernels.ops has no Triton element functions (elements.OPS)")
    _check_order(_spec, elements.OPS[_spec.name])
    register("triton", _spec.name, DEVICE_TYPES, device_step_scalars=True, stochastic_rounding=True, bf16_params=True)(
        functools.partial(launch, _spec))
