"""The bytes an optimizer holds and the bytes one of its steps touches, counted from the actual tensors.

Whatever an optimizer keeps between steps is reachable from it: its state, and attributes of its own (memkernels
keeps a previous gradient there; bitsandbytes its quantization maps). Counting what is reachable, by distinct
storage, measures that without knowing any library's layout; the parameters, which belong to the model, are
left out.
"""
from __future__ import annotations

import types
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

DEPTH = 8  # an optimizer's tensors sit a few containers deep (state -> param -> key); this bounds the walk
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, str, bytes)


def reachable_tensors(root: Any) -> Iterator[Tensor]:
    """Every tensor reachable from root through dicts' values, sequences, sets and objects' attributes; a tensor
    subclass that wraps others (torchao's 8-bit states) yields the tensors it wraps."""
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> Iterator[Tensor]:
        if id(obj) in seen or depth > DEPTH or isinstance(obj, _OPAQUE):
            return
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.nn.Parameter:
                inner, _ = obj.__tensor_flatten__()
                for name in inner:
                    yield from walk(getattr(obj, name), depth + 1)
            else:
                yield obj
            return
        if isinstance(obj, dict):
            children: Iterable[Any] = obj.values()
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = obj
        elif hasattr(obj, "__dict__"):
            children = vars(obj).values()
        else:
            return
        for child in list(children):
            yield from walk(child, depth + 1)

    return walk(root, 0)


def _storage(t: Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


def held_bytes(root: Any, params: list[Tensor]) -> int:
    """The bytes of the distinct storages reachable from root (an optimizer, or its state), the parameters'
    excluded: its states and anything else it keeps (a gradient that zero_grad() would otherwise free). A view
    counts its whole storage, once."""
    model = {_storage(p) for p in params}
    storages: dict[tuple[torch.device, int], int] = {}
    for t in reachable_tensors(root):
        key = _storage(t)
        if key not in model and key[1] != 0:
            storages[key] = t.untyped_storage().nbytes()
    return sum(storages.values())


def touched_bytes(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> int:
    """The bytes of the distinct arrays one step reads or writes: the parameters and their gradients (element
    size x numel each) and the optimizer's state (its states, a kept previous gradient, the probe's origins),
    each counted once. A kept previous gradient is held besides the gradient the next step reads, so it counts
    apart from .grad even while they are one tensor (right after the step that kept it)."""
    arrays = sum(t.element_size() * t.numel() for p in params for t in (p, p.grad) if t is not None)
    return arrays + held_bytes(optimizer.state, params)
