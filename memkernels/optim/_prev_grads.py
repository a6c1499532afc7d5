"""The trajectory HVP's previous gradients: a buffer the kernel writes, or the gradient tensor itself, kept.

Step n needs g_{n-1}. The portable way is a buffer (the state's prev_grad) that the kernel reads and then
overwrites with g_n in the same pass: 8 bytes per fp32 parameter. When backward hands the optimizer a new
gradient tensor every step, as after zero_grad() (set_to_none=True, torch's default), that tensor holds g_n
already and nothing writes it again; the state can hold the tensor itself, which the next step only reads:
4 bytes (AdamW's step 36 -> 32 bytes per parameter), and the buffer is freed.

A gradient is kept only where that gives the numbers the buffer would:
- it is not the tensor of the previous step (a loop that reuses one gradient tensor, zeroed in place, would
  overwrite it: such loops keep the buffer), owns its memory alone (no view, no other tensor on its storage:
  DDP's bucket views and flat gradient buffers are written in place) and has the compute dtype;
- the step has no AMP scale and maximize is off (the buffer holds the processed gradient, g * inv_scale);
- host mode and no DTensor (the checks read Python objects; DTensor.to_local makes a new tensor each time).
A kept gradient is checked before it is read: if it was written since (its version counter moved, or the
new gradient shares its memory), g_{n-1} is gone. That parameter steps once without the HVP, as a new state
does, with a warning, and the optimizer uses buffers from then on. The one write the check cannot see is one
through `.data`, which torch itself does not version either.
"""
from __future__ import annotations

import weakref
from operator import attrgetter, is_, itemgetter
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor

from ._warn import warn

Mode = Literal["copy", "keep", "fresh", "lost"]

_LOST = ("memkernels: a gradient kept as the previous gradient of the trajectory HVP was written in place "
         "after the step that kept it (the loop went from new gradient tensors to reusing them?); those "
         "parameters step once without the memory correction's HVP, and this optimizer copies gradients "
         "from now on")


_version, _base, _dtype = attrgetter("_version"), attrgetter("_base"), attrgetter("dtype")


def _users(tensors: Sequence[Tensor]) -> Iterator[int]:
    """How many hold each tensor's storage, counted in C (a list's tensors with no Python call each)."""
    return map(torch._C._storage_Use_Count, map(attrgetter("_cdata"), map(Tensor.untyped_storage, tensors)))


_SOLE_OWNER = next(_users([torch.empty(1)]))  # what _users counts for a tensor that alone holds its storage


def _sole_owner(t: Tensor) -> bool:
    """t is no view and no other tensor shares its storage."""
    return t._base is None and next(_users((t,))) == _SOLE_OWNER


class PrevGrads:
    """One optimizer's record of which prev_grad states are kept gradients, and the gradients seen last."""

    def __init__(self) -> None:
        # keyed by id(param) (a tensor's __hash__ is a Python call); the param_groups hold the params
        self.kept: dict[int, tuple[Tensor, int]] = {}  # -> (the kept gradient, its version then)
        self.seen: dict[int, weakref.ref] = {}  # -> the gradient of its last step with a buffer
        self.buffers_only = False  # set once a kept gradient was found overwritten

    def plan(self, p: Tensor, grad: Tensor, ref: Tensor | None, keepable: bool,
             dtype: torch.dtype) -> tuple[Mode, Tensor | None]:
        """How this step treats p's previous gradient, and a new prev_grad state (None: the state's stays).

        copy: the kernel reads the buffer and writes g into it; keep: it reads ref only, and the state
        holds grad after the step; fresh (no previous gradient) and lost (overwritten): no HVP this step,
        the kernel writes g into a new buffer. Changes nothing: record() does, after the step.
        keepable: the step allows keeping at all (host mode, no AMP scale, no maximize, no DTensor).
        """
        if ref is None:
            return "fresh", torch.zeros_like(p, dtype=dtype)
        keep = keepable and not self.buffers_only and grad.dtype == dtype
        kept = self.kept.get(id(p)) if self.kept else None
        if kept is not None and kept[0] is ref:
            version = ref._version
            if grad is ref:  # unchanged: a second step on the same gradient, where M = 0 either way
                return ("fresh" if version == kept[1] else "lost"), torch.zeros_like(p, dtype=dtype)
            if version != kept[1] or grad.data_ptr() == ref.data_ptr() != 0:  # written since, or shared
                return "lost", torch.zeros_like(p, dtype=dtype)
            if keep and _sole_owner(grad):
                return "keep", None
            return "copy", ref.clone()  # a buffer that holds g_{n-1}, for the kernel to overwrite
        if keep:
            seen = self.seen.get(id(p))
            if (seen is None or seen() is not grad) and _sole_owner(grad):
                return "keep", None
        return "copy", None

    def all_kept_again(self, params: Sequence[Tensor], grads: Sequence[Tensor], refs: Sequence[Tensor],
                       dtype: torch.dtype) -> bool:
        """plan() would say "keep" for every (p, grad, ref): the steady state of a loop that makes new gradient
        tensors, checked a list at a time (maps over tensor attributes, in C) instead of a call per parameter.
        False where any parameter may need another answer; plan() then decides each."""
        if self.buffers_only or set(map(_dtype, grads)) != {dtype}:
            return False
        try:
            kept = list(map(self.kept.__getitem__, map(id, params)))
        except KeyError:
            return False
        if not all(map(is_, map(itemgetter(0), kept), refs)) or list(map(_version, refs)) != list(map(
                itemgetter(1), kept)) or any(map(is_, grads, refs)):
            return False
        pointers = set(map(Tensor.data_ptr, refs))
        pointers.discard(0)
        return (pointers.isdisjoint(map(Tensor.data_ptr, grads)) and list(map(_base, grads)).count(None) == len(grads)
                and set(_users(grads)) == {_SOLE_OWNER})

    def record_kept(self, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict]) -> None:
        """record() of a step where every parameter's mode was "keep"."""
        for state, grad in zip(states, grads):
            state["prev_grad"] = grad
        self.kept.update(zip(map(id, params), zip(grads, map(_version, grads))))
        if self.seen:
            for p in params:
                self.seen.pop(id(p), None)

    def record(self, p: Tensor, grad: Tensor, state: dict, mode: Mode, keepable: bool) -> None:
        """After the step: a kept gradient becomes the state's prev_grad; otherwise remember which tensor grad was."""
        if mode == "keep":
            state["prev_grad"] = grad
            self.kept[id(p)] = (grad, grad._version)
            self.seen.pop(id(p), None)
            return
        if self.kept:
            self.kept.pop(id(p), None)
        if mode == "lost" and not self.buffers_only:
            self.buffers_only = True
            warn(_LOST, RuntimeWarning)
        if keepable:
            seen = self.seen.get(id(p))
            if seen is None or seen() is not grad:
                self.seen[id(p)] = weakref.ref(grad)
