"""A group's parameters with gradients, grouped into op calls (buckets), with the state each call needs.

New states are returned, not stored: the step stores them once everything is checked (docs/DESIGN.md, a step
is all or nothing).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from .. import _ops
from . import _compact
from ._layout import grad_in_param_order, itself, local, shard_groups
from ._prev_grads import Mode

if TYPE_CHECKING:
    from ._base import MemoryOptimizer


@dataclasses.dataclass(eq=False)
class Bucket:
    """Parameters of group gi that one op call updates together (same device, dtype and step), and that call.

    n is the step count in host mode (None in device mode, where `step` is the first param's count).
    hvp: how H d is estimated this step (None: not measured); estimate: it is estimated this step (else the
    kept estimates in hvps are reused, hvp_every > 1). fresh_refs: no previous gradients (no trajectory
    estimate this step); keep_refs: the trajectory's previous gradients are kept gradients, read and not
    written; keepable: this bucket's gradients may be kept (see _prev_grads.py). ref: the probe or exact
    mode's reference gradients and their hvp_scale, once computed; origins and tau: the probe pass's.
    lists: the op's state lists; kwargs: its scalars (_base.py); ratio: the trajectory ratio at this step;
    skip: device mode's mask of a skipped trajectory estimate (_estimates.py); checked: the tensors are those
    of a kept plan, checked when it was made (_reuse.py); kept_again: every previous gradient was kept at the
    last step and is kept again (prev_grad_modes empty: PrevGrads.record_kept after the call).
    """

    gi: int
    group: dict
    n: int | None
    hvp: str | None
    fresh_refs: bool
    keep_refs: bool
    keepable: bool
    step: Tensor | None = None
    shard_groups: tuple = ()  # process groups over which the shards' diagnostics add up
    local: Callable[[Tensor], Tensor] = itself  # layout.local for DTensor parameters
    estimate: bool = True
    numel: int = 0  # global: a DTensor counts all its shards
    params: list[Tensor] = dataclasses.field(default_factory=list)
    indices: list[int] = dataclasses.field(default_factory=list)  # the params' in the optimizer's (_compact.keys)
    grads: list[Tensor] = dataclasses.field(default_factory=list)
    states: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    counts: list[Tensor] = dataclasses.field(default_factory=list)  # the states' step counts
    grad_refs: list[Tensor] = dataclasses.field(default_factory=list)
    prev_grad_modes: list[tuple[Tensor, Tensor, dict, Mode]] = dataclasses.field(default_factory=list)
    kept_again: bool = False
    hvps: list[Tensor] = dataclasses.field(default_factory=list)
    origins: list[Tensor] = dataclasses.field(default_factory=list)
    tau: Tensor | None = None
    ref: tuple[list[Tensor], float] | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    lists: list[list[Tensor]] = dataclasses.field(default_factory=list)
    compensations: list[Tensor] = dataclasses.field(default_factory=list)  # kahan: the params' compensations
    ratio: float | Tensor = 1.0
    skip: Tensor | None = None
    checked: bool = False


def plan_group(opt: MemoryOptimizer, gi: int, group: dict, hvp: str | None,
               scaled: bool) -> tuple[list[Bucket], dict[Tensor, dict]]:
    """The buckets of group gi and the new states they use (not stored yet).

    hvp: this step's estimate of H d (MemoryOptimizer.hvp_mode); scaled: the step has an AMP grad scale.
    """
    buckets: dict[tuple, Bucket] = {}
    created: dict[Tensor, dict] = {}
    on_device, trajectory, capturable = opt.device_mode(group), hvp == "trajectory", group["capturable"]
    keeps = trajectory and not (on_device or scaled or group["maximize"])
    compiling = torch.compiler.is_compiling()  # traced tensors have no data pointers to compare
    first = sum(len(g["params"]) for g in opt.param_groups[:gi])
    for index, p in enumerate(group["params"], first):
        grad = p.grad
        if grad is None:
            continue
        if grad.is_sparse:
            raise TypeError(f"memkernels.{type(opt).__name__} does not support sparse gradients")
        shards = shard_groups(p)
        if shards is None and not compiling and grad.stride() != p.stride():  # the rare case, tested first
            grad = grad_in_param_order(p, grad, opt._warned)
        if shards is None and not compiling and grad.numel() and grad.data_ptr() == p.data_ptr() != 0:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} is its own gradient (p.grad shares p's "
                             "memory); the step would read the gradient it is overwriting")
        if shards is not None and hvp not in (None, "trajectory"):
            raise ValueError(f"hvp={hvp!r} with DTensor parameters is not supported; use "
                             "hvp='trajectory' (its estimate is elementwise, so it needs no communication)")
        state = opt.state.get(p)
        if not state:
            state = created[p] = opt.new_state(p, group)
        elif "step" not in state:  # e.g. loaded from torch.optim.SGD or lion_pytorch, which keep no count
            state = created[p] = {**state, "step": opt.new_step(p, group)}
        if group["kahan"] and "compensation" not in state:  # e.g. loaded from a checkpoint without kahan
            state = created[p] = {**state, "compensation": _compact.new_compensation(p)}
        if capturable and state["step"].device != p.device:  # e.g. from a host-mode checkpoint
            state = created[p] = {**state, "step": state["step"].to(p.device)}
        mode: Mode = "copy"
        keepable = keeps and shards is None
        if trajectory:  # "fresh" e.g. when loaded from torch.optim: no previous gradient, no HVP this step
            mode, prev_grad = opt._prev_grads.plan(p, grad, state.get("prev_grad"), keepable,
                                                   _compact.buffer_dtype(p, group))
            if prev_grad is not None:
                state = created[p] = {**state, "prev_grad": prev_grad}
        elif "prev_grad" in state:  # another estimate this step: the next trajectory step starts afresh
            state = created[p] = {k: v for k, v in state.items() if k != "prev_grad"}
        fresh_refs, keep_refs = mode in ("fresh", "lost"), mode == "keep"
        n = None if on_device else int(state["step"].item())
        key = (p.device, p.dtype, n, fresh_refs, keep_refs, shards)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = Bucket(gi, group, n, hvp, fresh_refs, keep_refs, keepable,
                                           step=state["step"] if on_device else None, shard_groups=shards or (),
                                           local=local if shards is not None else itself)  # DTensor grads, states
        bucket.numel += p.numel()
        bucket.params.append(bucket.local(p))
        bucket.indices.append(index)
        bucket.grads.append(bucket.local(grad))
        bucket.states.append(state)
        bucket.counts.append(state["step"])
        if trajectory:
            bucket.grad_refs.append(bucket.local(state["prev_grad"]))
            bucket.prev_grad_modes.append((p, grad, state, mode))
    if group["hvp_every"] > 1 and hvp in ("probe", "exact"):
        for bucket in buckets.values():
            _plan_reuse(bucket, created)
    for bucket in buckets.values():
        bucket.lists = [[bucket.local(s[k]) for s in bucket.states if k in s] for k in opt.state_keys]
        if group["kahan"]:
            bucket.compensations = [bucket.local(s["compensation"]) for s in bucket.states]
    return list(buckets.values()), created


def _plan_reuse(bucket: Bucket, created: dict[Tensor, dict]) -> None:
    """hvp_every = k: estimate H d at steps 0, k, 2k, ... (and wherever no estimate is kept); reuse it between."""
    n = bucket.n if bucket.n is not None else int(bucket.step.item())  # device mode: a host read (documented)
    bucket.estimate = n % bucket.group["hvp_every"] == 0 or any("hvp" not in s for s in bucket.states)
    for i, (p, state) in enumerate(zip(bucket.params, bucket.states)):
        if "hvp" not in state:
            state = created[p] = bucket.states[i] = {**state, "hvp": torch.zeros_like(
                p, dtype=_compact.buffer_dtype(p, bucket.group), memory_format=torch.preserve_format)}
        bucket.hvps.append(state["hvp"])


def op_function(op: str) -> Callable[..., None]:
    """The op to call: its eager implementation, or the registered op while torch.compile traces."""
    return getattr(_ops, op + "_") if torch.compiler.is_compiling() else _ops.EAGER[op]


def scalars(op: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's scalars with the step_scalars tensor's values in place of their placeholders (device mode)."""
    if kwargs.get("step_scalars") is None:
        return kwargs
    return {**kwargs, **dict(zip(_ops.STEP_SCALARS[op], kwargs["step_scalars"].unbind()))}
