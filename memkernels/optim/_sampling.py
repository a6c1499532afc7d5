"""track_memory=k: the diagnostics of one step in k, at the cost of that step alone.

A group that only tracks (no correction) runs its plain plan on every step (_reuse.py keeps it), so a sampled
step must not plan afresh: planning and checking a small model's 148 tensors costs more than its kernels.
The sampled step turns the plain plan's buckets into trajectory calls that read the step before's gradients
as they read a kept gradient (raw: unscaled and oriented by the kernel with the grads) and write nothing back.

The step before keeps those gradients as they are, as the trajectory keeps a gradient (_prev_grads.py): a loop
that makes new gradient tensors (zero_grad(set_to_none=True), torch's default) leaves them untouched, and
nothing is copied. Where one was written since (its version moved, or the new gradient is the same tensor or
shares its memory: a loop that zeroes gradients in place), the sampled step has no estimate for its bucket,
says so once, and the optimizer copies from then on; so does a step with an AMP scale, whose copies are
unscaled by their own step's scale (the sampled step scales what it reads by its own), and a group whose
buffers are bfloat16 (state_dtype), whose copies are rounded to them. A bucket missing a gradient (the first
sample, a step skipped by AMP, a param that had none) also steps without an estimate, as the trajectory's
first step does. What is kept lives from one step to the next: between samples nothing is held.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from ..reference import inv_scale
from . import _compact
from ._buckets import Bucket
from ._warn import warn

TRAJECTORY = ("auto", "trajectory")  # the hvp settings that use the trajectory without a closure

_WRITTEN = ("memkernels: a gradient kept for a sampled step of track_memory=k was written in place before it (a "
            "loop that zeroes gradients in place?); that step's buckets have no estimate of H d, and the optimizer "
            "copies the gradients for its samples from now on")


class _Kept(NamedTuple):
    grad: Tensor
    version: int | None  # the kept gradient's version when kept; None for a copy, which nothing else writes


class SampledGradients:
    """The gradients of the step before a sampled step, by the param's index in the optimizer."""

    def __init__(self) -> None:
        self.kept: dict[int, _Kept] = {}
        self.copy = False  # a kept gradient was found written in place: copy from now on

    def keep(self, buckets: list[Bucket], grad_scale: Tensor | None) -> None:
        for bucket in buckets:
            dtype = _compact.buffer_dtype(bucket.params[0], bucket.group)
            if grad_scale is None and not self.copy and bucket.grads[0].dtype == dtype:
                self.kept.update(zip(bucket.indices, (_Kept(g, g._version) for g in bucket.grads)))
                continue
            copies = torch._foreach_mul(bucket.grads, inv_scale(grad_scale))  # one call for the bucket's tensors
            self.kept.update((i, _Kept(c if c.dtype == dtype else c.to(dtype), None))
                             for i, c in zip(bucket.indices, copies))

    def measured(self, buckets: list[Bucket], grad_scale: Tensor | None) -> list[Bucket]:
        """The buckets as trajectory calls on the kept gradients, which they use up."""
        out = []
        for bucket in buckets:
            kept = [self.kept.pop(index, None) for index in bucket.indices]
            refs = None if None in kept else self._intact(kept, bucket.grads)
            fresh = refs is None
            if fresh:
                dtype = _compact.buffer_dtype(bucket.params[0], bucket.group)
                refs = [torch.zeros_like(p, dtype=dtype) for p in bucket.params]
            elif grad_scale is not None:  # the kernel unscales refs by this step's scale, as it does grads
                refs = torch._foreach_mul(refs, 1.0 / inv_scale(grad_scale))
            out.append(dataclasses.replace(bucket, hvp="trajectory", fresh_refs=fresh, keep_refs=True,
                                           grad_refs=refs))
        return out

    def _intact(self, kept: list[_Kept], grads: list[Tensor]) -> list[Tensor] | None:
        """The kept gradients, or None where one was written since it was kept (then copies from now on)."""
        for (ref, version), grad in zip(kept, grads):
            if version is not None and (ref is grad or ref._version != version
                                        or ref.data_ptr() == grad.data_ptr() != 0):
                if not self.copy:
                    self.copy = True
                    warn(_WRITTEN, RuntimeWarning)
                return None
        return [k.grad for k in kept]
