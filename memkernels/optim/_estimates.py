"""How a step estimates H d per bucket (docs/THEORY.md section 5): the mode, the scale the kernel applies, and
the probe and exact passes, which run before the step writes anything.

trajectory: M from the change of the gradient since the previous step, scaled by hvp_scale = 1 / (prev_lr r)
(r: the schedule's trajectory ratio); free, sound with full or large batches. probe: one pass writes
theta + tau d into the params (their origins keep theta), the closure's gradient there is the reference, and
the step divides by tau. exact: g + H d by double backward, hvp_scale 1. The math is in _hvp.py.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..reference import compute_dtype
from . import _hvp
from ._buckets import Bucket, op_function, scalars
from ._warn import warn

HVP_MODES = ("auto", "trajectory", "probe", "exact")
_AUTO_TRAJECTORY = ("memkernels: hvp='auto' without step(closure) estimates H d from the change of the gradient "
                    "between steps (hvp='trajectory'); with minibatch noise that difference is noise/lr. Fine "
                    "with full or large batches; with minibatches pass step(closure) (the probe estimate: one "
                    "extra gradient on the same batch), or set hvp='trajectory' to silence this.")


def resolve_auto(hvp: str, closure: Callable | None, warned: set[str]) -> str:
    """A measuring group's estimate: "auto" is the probe when step() gets a closure (sound with minibatches)
    and the trajectory otherwise, which is said once (warned)."""
    if hvp != "auto":
        return hvp
    if closure is not None:
        return "probe"
    if "auto" not in warned and not torch.compiler.is_compiling():
        warned.add("auto")
        warn(_AUTO_TRAJECTORY, UserWarning)
    return "trajectory"


def scale_limit(p: Tensor) -> float:
    """The largest 1/h of a trajectory estimate: the square root of the kernels' compute dtype's max (fp32:
    1.8e19, so h below ~5e-20). Beyond it M = (g - g_prev)/h can overflow to inf and the term h^2 M become
    NaN, while the step h F it would correct is below the resolution of any parameter above ~1e-12. Such
    steps go without the estimate (M = 0), counted in memory_stats()["skipped_estimates"]."""
    return math.sqrt(torch.finfo(compute_dtype(p)).max)


def hvp_scale(bucket: Bucket) -> tuple[float, bool]:
    """Host mode's hvp_scale, and whether a trajectory estimate was skipped for its scale (scale_limit): the
    reference's where a probe or the exact mode made one, 0 without an estimate (step 0, no previous gradient,
    a zero lr before)."""
    if bucket.ref is not None:
        return bucket.ref[1], False
    if bucket.hvp != "trajectory" or bucket.n == 0 or bucket.fresh_refs:
        return 0.0, False
    prev_lr = float(bucket.group.get("prev_lr", bucket.group["lr"]))
    if prev_lr == 0.0:
        return 0.0, False
    scale = 1.0 / (prev_lr * bucket.ratio)
    if scale > scale_limit(bucket.params[0]):
        return 0.0, True
    return scale, False


def hvp_scale_at(bucket: Bucket, n: Tensor) -> tuple[Tensor, Tensor | None]:
    """hvp_scale in tensor ops on the step count n, and the mask of a skipped trajectory estimate (a probe's
    scale comes from its tau in the op)."""
    if bucket.hvp == "exact":
        return torch.ones_like(n), None
    if bucket.hvp != "trajectory" or bucket.fresh_refs:
        return torch.zeros_like(n), None
    denominator = on(bucket.group.get("prev_lr", bucket.group["lr"]), n) * bucket.ratio
    estimated = (n > 0) & (denominator > 0)
    skip = estimated & (denominator * scale_limit(bucket.params[0]) < 1.0)
    return torch.where(estimated & ~skip, 1.0 / denominator, 0.0), skip


def on(value: float | Tensor, like: Tensor) -> Tensor:
    """A float or one-element tensor hyperparameter as a 0-d tensor of like's dtype and device."""
    if isinstance(value, Tensor):
        return value.detach().reshape(()).to(device=like.device, dtype=like.dtype)
    return torch.full_like(like, float(value))


def estimate(op: str, buckets: list[Bucket], closure: Callable | None, direction: _hvp.Direction,
             probes: _hvp.Probes) -> None:
    """The exact mode's g + H d, and the probe: its pass, then the closure's gradients at the probe point. A
    probe pass or closure that raises puts theta back in every bucket whose pass completed."""
    for bucket in buckets:
        if bucket.hvp == "exact" and bucket.estimate:
            bucket.ref = (_hvp.exact(direction, scalars(op, bucket.kwargs), bucket.params, bucket.grads), 1.0)
            for p, g in zip(bucket.params, bucket.grads):
                p.grad = g.detach()
            bucket.grads = [g.detach() for g in bucket.grads]
    probing = [bucket for bucket in buckets if bucket.hvp == "probe" and bucket.estimate]
    if not probing:
        return
    passed, kept = [], []
    try:
        for bucket in probing:
            key = (bucket.gi, bucket.params[0].device, bucket.params[0].dtype)
            call_scalars = scalars(op, bucket.kwargs)
            bucket.tau = probes.tau(key, bucket.params, lambda: _hvp.first_norms(
                direction, call_scalars, bucket.params, bucket.grads))
            bucket.origins = probes.buffers(bucket.params)
            norms = torch.zeros(2, dtype=torch.float64, device=bucket.params[0].device)
            probe_pass(op_function(op), bucket, bucket.origins, bucket.tau, norms)
            passed.append(bucket)  # its params hold theta + tau d, its origins theta (a pass that raised
            # inside its kernel is the one case left half done: docs/DESIGN.md)
            kept.append((key, bucket.params, norms))
        grads = _hvp.probe_gradients([p for bucket in probing for p in bucket.params], closure)
    except BaseException:  # the step does not happen: theta goes back from the origins
        for bucket in passed:
            torch._foreach_copy_(bucket.params, bucket.origins)
        raise
    for key, params, norms in kept:  # the next pass's tau, from a step that happened
        probes.keep(key, params, norms)
    start = 0
    for bucket in probing:
        bucket.ref = (grads[start:start + len(bucket.params)], 0.0)  # hvp_scale: 1 / tau, from the op
        start += len(bucket.params)


def probe_pass(op: Callable[..., None], bucket: Bucket, origins: list[Tensor], tau: Tensor, norms: Tensor) -> None:
    """The op's probe pass over a bucket: origins <- theta, theta <- theta + tau d, norms += (|theta|^2, |d|^2)."""
    op(bucket.params, bucket.grads, *bucket.lists, [], None, **{**bucket.kwargs, "hvps": []}, probe=True,
       origins=origins, probe_tau=tau, probe_norms=norms)
