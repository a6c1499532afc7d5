"""Loaded optimizer states made steppable, or refused naming what is wrong (docs/DESIGN.md, layouts and
checkpoints): every state is checked before any is changed."""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from ._layout import in_order_of, other_order


def adopt(state: dict, name: str, state_keys: tuple[str, ...], optional_state_keys: tuple[str, ...]) -> None:
    """A state_dict's states, checked, then in place: tensors in their param's element order (a checkpoint of a
    contiguous model into a channels_last one), step counts as float32 tensors, torch.optim.SGD's None buffer
    (before its first step) dropped. name: the optimizer, for the messages."""
    loaded = [st for st in state.get("state", {}).values() if isinstance(st, dict)]
    for i, st in enumerate(loaded):
        _check(st, i, name, state_keys, optional_state_keys)
    steps = {id(st): step_count(st["step"], i) for i, st in enumerate(loaded) if "step" in st}
    for p, st in state.get("state", {}).items():
        if isinstance(st, dict) and isinstance(p, Tensor):
            for key, value in st.items():
                if type(value) is Tensor and type(p) in (Tensor, torch.nn.Parameter) and other_order(value, p):
                    st[key] = in_order_of(p, value)
    for st in loaded:
        if id(st) in steps:
            st["step"] = steps[id(st)]
        for key in optional_state_keys:
            if key in st and st[key] is None:
                del st[key]


def _check(st: dict, index: int, name: str, state_keys: tuple[str, ...],
           optional_state_keys: tuple[str, ...]) -> None:
    """A ValueError naming the key when a loaded state is another optimizer's or lacks a tensor."""
    kept = {"step", "prev_grad", "hvp", "compensation", *state_keys}
    foreign = sorted(set(st) - kept)
    if foreign:
        raise ValueError(f"state {index} holds {foreign}, which {name} does not keep (it keeps {sorted(kept)}): "
                         "a state_dict of another optimizer")
    for key in (*state_keys, "prev_grad", "hvp", "compensation"):
        value = st.get(key)
        if value is None and key in state_keys and key not in optional_state_keys and st:
            raise ValueError(f"state {index} lacks {key!r}, a tensor {name} needs")
        if value is not None and not isinstance(value, Tensor):
            raise ValueError(f"state {index}: {key!r} must be a tensor, got {type(value).__name__}")


def step_count(step: Any, index: int) -> Tensor:
    """A checkpoint's step count as the float32 tensor a step bumps in place (older torch checkpoints hold Python
    numbers, some int64 tensors); not a finite count >= 0: a ValueError naming the state."""
    if not isinstance(step, (Tensor, numbers.Real)) or isinstance(step, Tensor) and step.numel() != 1:
        raise ValueError(f"state {index}: 'step' must be a number or a one-element tensor, got "
                         f"{type(step).__name__}{f' of shape {tuple(step.shape)}' if isinstance(step, Tensor) else ''}")
    count = float(step.detach().double() if isinstance(step, Tensor) else step)
    if not math.isfinite(count) or count < 0:
        raise ValueError(f"state {index}: 'step' must be a finite count >= 0, got {count}")
    if isinstance(step, Tensor) and step.dtype == torch.float32:
        return step
    return torch.tensor(count, dtype=torch.float32, device=step.device if isinstance(step, Tensor) else "cpu")
