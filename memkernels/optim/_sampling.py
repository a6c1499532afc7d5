"""track_memory=k: the diagnostics of one step in k, at the cost of that step alone.

A group that only tracks (no correction) runs its plain plan on every step (_reuse.py keeps it), so a sampled
step must not plan afresh: planning and checking a small model's 148 tensors costs more than its kernels.
The step before a sampled one copies its gradients, unscaled (AMP), in the buffers' dtype; the sampled step
turns the plain plan's buckets into trajectory calls that read those copies as they read a kept gradient:
raw, unscaled and oriented by the kernel with the grads (so the copies are scaled by this step's grad scale
first), and write nothing back. A bucket missing a copy (its first step, a
step skipped by AMP, a param that had no gradient) steps without an estimate, as the trajectory's first step
does. The copies live from one step to the next: between samples nothing is held.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..reference import inv_scale
from . import _compact
from ._buckets import Bucket

TRAJECTORY = ("auto", "trajectory")  # the hvp settings that use the trajectory without a closure


class SampledGradients:
    """The copied gradients of the step before a sampled step, by the param's index in the optimizer."""

    def __init__(self) -> None:
        self.copies: dict[int, Tensor] = {}

    def keep(self, buckets: list[Bucket], grad_scale: Tensor | None) -> None:
        scale = inv_scale(grad_scale)
        for bucket in buckets:
            dtype = _compact.buffer_dtype(bucket.params[0], bucket.group)
            copies = torch._foreach_mul(bucket.grads, scale)  # one call for the bucket's new tensors
            self.copies.update(zip(bucket.indices, (c if c.dtype == dtype else c.to(dtype) for c in copies)))

    def measured(self, buckets: list[Bucket], grad_scale: Tensor | None) -> list[Bucket]:
        """The buckets as trajectory calls on the kept copies, which they use up."""
        out = []
        for bucket in buckets:
            copies = [self.copies.pop(index, None) for index in bucket.indices]
            fresh = any(c is None for c in copies)
            if fresh:
                dtype = _compact.buffer_dtype(bucket.params[0], bucket.group)
                copies = [torch.zeros_like(p, dtype=dtype) for p in bucket.params]
            elif grad_scale is not None:
                torch._foreach_mul_(copies, 1.0 / inv_scale(grad_scale))
            out.append(dataclasses.replace(bucket, hvp="trajectory", fresh_refs=fresh, keep_refs=True,
                                           grad_refs=copies))
        return out
