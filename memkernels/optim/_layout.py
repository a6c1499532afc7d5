"""Where a parameter's elements are: its memory against the others', its element order, its DTensor shards.

The kernels walk every tensor of a param in the param's element order and update each element once, so a
step needs parameters that share no memory and gradients and states in their param's order (docs/DESIGN.md,
layouts and checkpoints). A DTensor param is stepped through its local shard.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ops
from ._warn import warn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None


def check_disjoint(params: list[Tensor]) -> None:
    """A ValueError naming two parameters (their positions over all groups) that are one tensor or share memory."""
    seen: dict[int, int] = {}
    spans = []
    for i, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(f"parameter {i} is parameter {seen[id(p)]} again; each parameter may appear once")
        seen[id(p)] = i
        if type(p) in (Tensor, torch.nn.Parameter) and p.device.type != "meta" and p.numel():
            start = p.untyped_storage().data_ptr() + p.storage_offset() * p.element_size()
            extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(p.shape, p.stride()))
            spans.append((start, start + extent * p.element_size(), i))
    spans.sort()
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"parameters {min(i, j)} and {max(i, j)} share memory; an optimizer step would "
                             "update it twice")


def other_order(t: Tensor, p: Tensor) -> bool:
    """t, of dense p's shape, does not hold its elements in p's order (another order, or not dense): the kernels
    walk every tensor of a param in the param's order. Equal strides, the common case, decide at once."""
    return (t.stride() != p.stride() and t.shape == p.shape and t.numel() > 1 and _ops.dense_layout(p)
            and not (_ops.dense_layout(t) and _ops.element_order(t) == _ops.element_order(p)))


def in_order_of(p: Tensor, t: Tensor) -> Tensor:
    """A copy of t in p's layout (t's dtype and device)."""
    return torch.empty_like(p, dtype=t.dtype, device=t.device).copy_(t)


def grad_in_param_order(p: Tensor, grad: Tensor, warned: set[str]) -> Tensor:
    """grad, or a copy of it in p's element order where they differ (a contiguous grad of a channels_last
    param). The copy is an extra pass over the grad, so it is announced once (warned)."""
    if grad.layout != torch.strided or not other_order(grad, p):
        return grad
    if "grad_layout" not in warned:
        warned.add("grad_layout")
        warn(f"memkernels: a gradient with strides {grad.stride()} for a parameter with strides "
             f"{p.stride()} (shape {tuple(p.shape)}) is copied into the parameter's layout at each step, an "
             "extra pass over it; gradients in their parameter's layout avoid it", RuntimeWarning)
    return in_order_of(p, grad)


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (an alias: updating it updates the DTensor); other tensors as they are."""
    return t.to_local() if is_dtensor(t) else t


def itself(t: Tensor) -> Tensor:
    return t


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def shard_groups(p: Tensor) -> tuple | None:
    """None for a plain tensor; for a DTensor the process groups of the mesh dimensions it is sharded over
    (its replicated dimensions hold copies, whose sums must not be added)."""
    if not is_dtensor(p):
        return None
    mesh = p.device_mesh
    return tuple(mesh.get_group(i) for i, placement in enumerate(p.placements) if placement.is_shard())
