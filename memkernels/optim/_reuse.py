"""A group's plan kept from one step to the next: its buckets, their state lists and the check of their tensors.

Planning and checking cost microseconds per parameter, more than the kernels of a small model, and in a steady
training loop nothing they read changes. A group planned in host mode, without DTensors and with no estimate
of H d or the trajectory's, is kept after each step that ran. The next step reuses its buckets where the group
holds the same params, each with a grad as before (the same tensor or a new one) in its param's layout and
not sharing a param's memory, the params keep their layouts, their states and the states' tensors are the
ones planned and keep the layouts checked (resize_ or .data can change them in place), the step counts of each
bucket are still equal, the trajectory's previous gradients sort into the same buckets and have the checked
layouts, and the flags that planning read are the same. Any other step plans and checks afresh, so
bad input raises as before (docs/DESIGN.md, a step is all or nothing). The comparisons run in C (map over
tensor attributes): a few microseconds per parameter less than a plan and a check.
"""
from __future__ import annotations

import dataclasses
import weakref
from itertools import chain, repeat
from operator import attrgetter, is_, is_not, itemgetter
from typing import Callable, Sequence

from torch import Tensor

from . import _compact
from ._buckets import Bucket
from ._prev_grads import PrevGrads

_grad, _shape, _dtype, _device = attrgetter("grad"), attrgetter("shape"), attrgetter("dtype"), attrgetter("device")


def _layouts(tensors: Sequence[Tensor]) -> tuple[list, ...]:
    """Shapes, strides, dtypes and devices (TypeError for a None, RuntimeError for a sparse tensor)."""
    return (list(map(_shape, tensors)), list(map(Tensor.stride, tensors)), list(map(_dtype, tensors)),
            list(map(_device, tensors)))


def _same(a: Sequence, b: Sequence) -> bool:
    """The same objects in the same order (tensors compared by identity, never by value)."""
    return len(a) == len(b) and all(map(is_, a, b))


@dataclasses.dataclass(eq=False)
class _Checked:
    """What one bucket's check covered: its params' layouts, its states' sizes and tensors (those of `keys`,
    the step count first, through `entries`), the layouts of the op's state tensors among them (`lists`: the
    counts are not checked, only read), and its previous gradients' layouts."""

    layouts: tuple[list, ...]
    sizes: list[int]
    entries: Callable[[dict], tuple]
    tensors: list[Tensor]
    keys: int  # tensors per state
    lists: list[Tensor]
    list_layouts: tuple[list, ...]
    ref_layouts: tuple[list, ...]

    @classmethod
    def of(cls, bucket: Bucket, keys: tuple[str, ...]) -> _Checked:
        present = tuple(k for k in keys if all(k in s for s in bucket.states))
        entries = itemgetter(*present) if len(present) > 1 else lambda s: (s[present[0]],)
        lists = list(chain.from_iterable(bucket.lists))
        return cls(_layouts(bucket.params), list(map(len, bucket.states)), entries,
                   list(chain.from_iterable(map(entries, bucket.states))), len(present), lists, _layouts(lists),
                   _layouts(bucket.grad_refs))


@dataclasses.dataclass(eq=False)
class Kept:
    """A group's plan after a step that ran, and what it was planned from."""

    params: list[Tensor]  # the group's params
    flags: tuple  # flags(): what planning read besides the tensors
    has_grad: list[bool]  # which params had a grad at that step
    # the trajectory's: each param's grad at that step, referred to weakly (zero_grad frees it as in torch.optim)
    grads: list[weakref.ref | None] | None
    buckets: list[Bucket]  # that step's buckets, without their grads
    checked: list[_Checked]  # per bucket


def flags(group: dict, hvp: str | None, scaled: bool) -> tuple:
    """What a group's plan depends on besides its tensors: its estimate, an AMP scale and the group's flags."""
    return hvp, scaled, bool(group["maximize"]), bool(group["capturable"]), group["hvp_every"]


def keep(group: dict, group_flags: tuple, buckets: list[Bucket], keys: tuple[str, ...],
         kept: Kept | None) -> Kept | None:
    """The plan to reuse at the next step, after a step that ran with these buckets (kept: the plan this step
    reused, whose checks still hold); None where the group's plan is made each step. keys: a state's step
    count and the op's state tensors."""
    if kept is None:
        if group_flags[0] not in (None, "trajectory") or any(
                b.n is None or b.shard_groups or not _same(b.grads, list(map(_grad, b.params))) for b in buckets):
            return None  # device mode, DTensor, or a grad copied into its param's order
        kept = Kept(list(group["params"]), group_flags, [], None, buckets, [_Checked.of(b, keys) for b in buckets])
    grads = list(map(_grad, group["params"]))
    kept.has_grad, kept.buckets = list(map(is_not, grads, repeat(None))), buckets
    kept.grads = list(map(_weak, grads)) if group_flags[0] == "trajectory" else None
    for bucket in buckets:  # what the next step reads of a template holds no gradient
        bucket.grads = []
        if bucket.keep_refs:  # last step's previous gradients, replaced in the states by this step's
            bucket.grad_refs = []
        if bucket.prev_grad_modes:  # only whether it recorded is read (_previous_gradients)
            bucket.prev_grad_modes = [(p, None, state, mode) for p, _, state, mode in bucket.prev_grad_modes]
    return kept


def _weak(t: Tensor | None) -> weakref.ref | None:
    return None if t is None else weakref.ref(t)


_GONE = object()  # a gradient freed since: never the same as the param's gradient now, None included


def _strong(ref: weakref.ref | None) -> Tensor | object | None:
    if ref is None:
        return None
    t = ref()
    return _GONE if t is None else t


def reuse(kept: Kept, group: dict, group_flags: tuple, state: dict, prev_grads: PrevGrads) -> list[Bucket] | None:
    """This step's buckets from the kept plan, or None where anything it was planned from has changed. Changes
    nothing (prev_grads.plan does not)."""
    params = group["params"]
    if group_flags != kept.flags or not _same(params, kept.params):
        return None
    grads = list(map(_grad, params))
    if list(map(is_not, grads, repeat(None))) != kept.has_grad:
        return None  # another set of params has grads
    same_grads = kept.grads is not None and _same(grads, list(map(_strong, kept.grads)))
    buckets = []
    for template, checked in zip(kept.buckets, kept.checked):
        bucket = _reused(template, checked, state)
        if bucket is None or template.hvp == "trajectory" and not _previous_gradients(
                bucket, template, checked, same_grads, prev_grads):
            return None
        buckets.append(bucket)
    return buckets


def _reused(template: Bucket, checked: _Checked, state: dict) -> Bucket | None:
    """A new bucket of the template's params with this step's grads and counts, where its check still holds."""
    params = template.params
    grads = list(map(_grad, params))
    try:  # the same grad tensor may have a new layout too (.data assigned)
        if _layouts(params) != checked.layouts or _layouts(grads) != checked.layouts:
            return None
    except (TypeError, RuntimeError):  # a grad is None or sparse
        return None
    pointers = set(map(Tensor.data_ptr, params))
    pointers.discard(0)
    if not pointers.isdisjoint(map(Tensor.data_ptr, grads)):
        return None  # a grad shares a param's memory
    states = list(map(state.get, params))
    if not _same(states, template.states) or list(map(len, states)) != checked.sizes:
        return None
    try:
        if not _same(list(chain.from_iterable(map(checked.entries, states))), checked.tensors):
            return None
    except KeyError:
        return None
    if _layouts(checked.lists) != checked.list_layouts:  # the same tensors, resized or given new .data
        return None
    counts = checked.tensors[::checked.keys]
    values = set(map(Tensor.item, counts))
    if len(values) != 1:
        return None
    return dataclasses.replace(template, n=int(values.pop()), grads=grads, counts=counts, grad_refs=[],
                               kept_again=False, prev_grad_modes=[], kwargs={}, checked=True)


def _previous_gradients(bucket: Bucket, template: Bucket, checked: _Checked, same_grads: bool,
                        prev_grads: PrevGrads) -> bool:
    """The trajectory's previous gradients of this step into the bucket; False where a param's would move it to
    another bucket, needs a new state or has another layout than those checked. Where last step copied every
    gradient into its buffer and this step has the same gradient tensors and buffers, PrevGrads.plan would say
    "copy" again and record would change nothing: both are skipped; where every gradient was kept and would be
    kept again, one check of the lists replaces plan's per parameter."""
    refs = [state.get("prev_grad") for state in bucket.states]
    if same_grads and not template.prev_grad_modes and not prev_grads.kept and _same(refs, template.grad_refs):
        return _checked_refs(bucket, refs, checked)
    dtype = _compact.buffer_dtype(bucket.params[0], bucket.group)
    if template.keep_refs and bucket.keepable and prev_grads.all_kept_again(bucket.params, bucket.grads, refs, dtype):
        bucket.kept_again = True
        return _checked_refs(bucket, refs, checked)
    modes = []
    for p, grad, ref in zip(bucket.params, bucket.grads, refs):
        mode, new = prev_grads.plan(p, grad, ref, bucket.keepable, dtype)
        if new is not None or (mode in ("fresh", "lost")) != bucket.fresh_refs or (mode == "keep") != bucket.keep_refs:
            return False
        modes.append(mode)
    if not _checked_refs(bucket, refs, checked):
        return False
    if modes.count("copy") < len(modes) or not same_grads or prev_grads.kept:
        bucket.prev_grad_modes = list(zip(bucket.params, bucket.grads, bucket.states, modes))
    return True


def _checked_refs(bucket: Bucket, refs: list[Tensor], checked: _Checked) -> bool:
    """The previous gradients into the bucket where they have the layouts checked (a new buffer, or one resized
    or given new .data since, has not been checked)."""
    try:
        if _layouts(refs) != checked.ref_layouts:
            return False
    except RuntimeError:  # sparse
        return False
    bucket.grad_refs = refs
    return True
