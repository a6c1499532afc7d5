"""Host side of the Triton backend: scalars as reference.py computes them, one launch per op call.

Every scalar the reference derives in Python (1 - beta1, lr / bias_correction1,
1 - lr * weight_decay, correction * lr * lr, correction_limit * lr, ...) is
derived here the same way in float64 and handed to the kernel, where it is
rounded to fp32 exactly as torch rounds a Python scalar against an fp32 tensor.
grad_scale, found_inf and probe_tau stay on the device: the kernel reads them,
so a step never syncs the host.

With a `step_scalars` tensor the per-step floats are placeholders: the kernel
reads their values from the tensor and derives the rest the host's way on the
device, so only the static scalars and flags (betas, eps, weight_decay,
correction, ...) are taken from the floats, and no step value picks a code path.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
import triton.language as tl
from torch import Tensor

from . import _triton_kernels as kernels
from . import register
from ._triton_table import block_map, pointer_table
from .triton import interpreting

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


def _launch(kernel, op: str, lists: Sequence[Sequence[Tensor]], diagnostics: Tensor | None,
            step_scalars: Tensor | None, scalars: dict[str, float], flags: dict[str, Any], *, correction: float,
            maximize: bool, memoryless: bool, update_grad_refs: bool, grad_scale: Tensor | None,
            found_inf: Tensor | None, origins: Sequence[Tensor], hvps: Sequence[Tensor], reuse_hvp: bool,
            probe: bool, probe_tau: Tensor | None, probe_norms: Tensor | None) -> None:
    """One launch over every tensor of the call; lists are params, grads, the op's state lists, then grad_refs
    (the table's columns, followed by origins and hvps)."""
    params, grad_refs = lists[0], lists[-1]
    device = _check_device(op, params)
    numels = [p.numel() for p in params]
    blocks = block_map(numels, BLOCK, device)
    if blocks.numel() == 0:
        return  # every tensor is empty
    lists = (*lists, origins, hvps)
    table, aligned = pointer_table(lists, numels, device)
    grad_scale, found_inf = _on(grad_scale, device), _on(found_inf, device)
    if step_scalars is not None and not step_scalars.is_contiguous():
        step_scalars = step_scalars.contiguous()  # the kernel reads consecutive float64s
    pointers = (diagnostics, grad_scale, found_inf, step_scalars, probe_tau, probe_norms)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:  # Triton launches on the current device's current stream
        kernel[(blocks.numel() // 2,)](
            table, blocks, *(blocks if t is None else t for t in pointers),  # blocks stands in for absent tensors
            **scalars, **flags, R=_dtype(grad_refs, params[0]), H=_dtype(hvps, params[0]),
            HAS_REF=bool(grad_refs), UPDATE_REFS=update_grad_refs, HAS_ORIGIN=bool(origins),
            STORE_HVP=bool(hvps) and not reuse_hvp, REUSE_HVP=reuse_hvp, PROBE=probe,
            HAS_TAU=probe_tau is not None, NORMS=probe_norms is not None, CORRECTION=correction != 0.0,
            MEMORYLESS=memoryless, MAXIMIZE=maximize, DEVICE_SCALARS=step_scalars is not None,
            DIAG=diagnostics is not None, HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
            ALIGNED=aligned, SOFT_BF16=interpreting(), NCOL=len(lists) + 1, BLOCK=BLOCK,
            num_warps=NUM_WARPS, enable_fp_fusion=False)  # no FMA contraction: the reference's rounding


def _dtype(lst: Sequence[Tensor], fallback: Tensor) -> tl.dtype:
    return _TL_DTYPES[(lst[0] if lst else fallback).dtype]


def _per_step(step_scalars: Tensor | None, names: Sequence[str], derive: Callable[[], dict[str, float]]
              ) -> dict[str, float]:
    """The kernel's per-step float arguments: derived on the host, or placeholders that the kernel replaces
    from step_scalars (the caller's floats are then placeholders too: nothing is derived from them)."""
    return derive() if step_scalars is None else dict.fromkeys(names, 0.0)


_ADAMW_STEP = ("lr", "bias_correction1", "bias_correction2", "bias_correction2_sqrt", "mean_age1", "mean_age2",
               "hvp_scale", "shrink", "step_size", "correction_lr2", "kappa_lr")
_LION_STEP = ("lr", "ema_weight", "age_weight", "hvp_scale", "shrink", "correction_lr2", "kappa_lr")
_SGD_STEP = ("lr", "update_scale", "memory_coef", "hvp_scale", "correction_lr2", "kappa_lr")


@register("triton", "adamw", DEVICE_TYPES, device_step_scalars=True)
def adamw(params, grads, exp_avgs, exp_avg_sqs, grad_refs, diagnostics, *, lr, beta1, beta2, eps, weight_decay,
          bias_correction1, bias_correction2, mean_age1, mean_age2, decoupled, eps_inside_sqrt, correction,
          correction_limit, hvp_scale, step_scalars: Tensor | None = None, **common: Any) -> None:
    p = params[0]
    scalars = dict(beta2=beta2, one_minus_beta1=1 - beta1, one_minus_beta2=1 - beta2, eps=eps,
                   weight_decay=weight_decay, weight_decay64=weight_decay, correction64=correction,
                   correction_limit64=correction_limit,
                   **_per_step(step_scalars, _ADAMW_STEP, lambda: dict(
                       lr=lr, bias_correction1=bias_correction1, bias_correction2=bias_correction2,
                       bias_correction2_sqrt=bias_correction2 ** 0.5, mean_age1=mean_age1, mean_age2=mean_age2,
                       hvp_scale=hvp_scale, shrink=1 - lr * weight_decay if decoupled else 1.0,
                       step_size=lr / bias_correction1, correction_lr2=correction * lr * lr,
                       kappa_lr=correction_limit * lr)))
    flags = dict(P=_dtype(params, p), S1=_dtype(exp_avgs, p), S2=_dtype(exp_avg_sqs, p),
                 EPS_INSIDE_SQRT=eps_inside_sqrt, DECOUPLED=decoupled)
    _launch(kernels.adamw_kernel, "adamw", (params, grads, exp_avgs, exp_avg_sqs, grad_refs), diagnostics,
            step_scalars, scalars, flags, correction=correction, **common)


@register("triton", "lion", DEVICE_TYPES, device_step_scalars=True)
def lion(params, grads, exp_avgs, grad_refs, diagnostics, *, lr, beta1, beta2, weight_decay, smoothing,
         ema_weight, age_weight, correction, correction_limit, hvp_scale, step_scalars: Tensor | None = None,
         **common: Any) -> None:
    p = params[0]
    scalars = dict(beta1=beta1, beta2=beta2, one_minus_beta1=1 - beta1, one_minus_beta2=1 - beta2,
                   weight_decay=weight_decay, smoothing=smoothing, weight_decay64=weight_decay,
                   correction64=correction, correction_limit64=correction_limit,
                   **_per_step(step_scalars, _LION_STEP, lambda: dict(
                       lr=lr, ema_weight=ema_weight, age_weight=age_weight, hvp_scale=hvp_scale,
                       shrink=1 - lr * weight_decay, correction_lr2=correction * lr * lr,
                       kappa_lr=correction_limit * lr)))
    flags = dict(P=_dtype(params, p), S1=_dtype(exp_avgs, p), SIGN=smoothing == 0.0)
    _launch(kernels.lion_kernel, "lion", (params, grads, exp_avgs, grad_refs), diagnostics, step_scalars, scalars,
            flags, correction=correction, **common)


@register("triton", "sgd", DEVICE_TYPES, device_step_scalars=True)
def sgd(params, grads, momentum_buffers, grad_refs, diagnostics, *, lr, momentum, weight_decay, nesterov,
        update_scale, memory_coef, correction, correction_limit, hvp_scale, step_scalars: Tensor | None = None,
        **common: Any) -> None:
    p = params[0]
    scalars = dict(momentum=momentum, weight_decay=weight_decay, correction64=correction,
                   correction_limit64=correction_limit,
                   **_per_step(step_scalars, _SGD_STEP, lambda: dict(
                       lr=lr, update_scale=update_scale, memory_coef=memory_coef, hvp_scale=hvp_scale,
                       correction_lr2=correction * lr * lr, kappa_lr=correction_limit * lr)))
    flags = dict(P=_dtype(params, p), S1=_dtype(momentum_buffers, p), HAS_MOMENTUM=bool(momentum_buffers),
                 NESTEROV=nesterov)
    _launch(kernels.sgd_kernel, "sgd", (params, grads, momentum_buffers, grad_refs), diagnostics, step_scalars,
            scalars, flags, correction=correction, **common)
