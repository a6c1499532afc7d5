"""Compact states (docs/DESIGN.md, "Compact states"): the dtype a group keeps its states in, and the keys of
their stochastic rounding.

A group with state_dtype=torch.bfloat16 keeps its op's states, the kept estimate of H d ("hvp") and a copied
previous gradient in bfloat16 (the math stays float32); otherwise states are as torch.optim makes them, in the
param's dtype, and the estimate and the copied gradient in the compute dtype. With state_rounding="stochastic"
every bfloat16 write rounds by ops/rounding.py under the key tensor_key(seed, step, tensor): step is the count
the step makes (1 for the first), tensor = (the param's index in the optimizer's param list, groups in order)
* SLOTS + the column in the op's rounding_keys, one per two writes (rounding.key_of_write: its states in spec
order, then the previous gradient, the kept estimate, then the param itself, with param_rounding="stochastic").
Neither depends on how params are bucketed nor on the backend, so a rerun with the same seed gives the same
bits on any backend that rounds stochastically.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
from torch import Tensor

from .._ops import PARAM_ROUNDINGS
from ..ops.rounding import keys_at
from ..reference import compute_dtype

STATE_DTYPES = (torch.float32, torch.bfloat16)
ROUNDINGS = ("stochastic", "nearest")
SLOTS = 8  # key columns reserved per param: more than any op's (_ops.KEY_COLUMNS)


def check_group(group: dict) -> None:
    """A ValueError naming state_dtype or state_rounding where the group cannot keep its states so."""
    dtype, rounding = group["state_dtype"], group["state_rounding"]
    if dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {dtype!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"state_rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if dtype != torch.bfloat16:
        return
    for p in group["params"]:
        if p.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype=torch.bfloat16 needs float32 or bfloat16 params (its math is float32); "
                             f"a parameter of shape {tuple(p.shape)} is {p.dtype}")


def check_params(group: dict) -> None:
    """A ValueError naming kahan or param_rounding where the group cannot write its params so."""
    kahan, rounding = group["kahan"], group["param_rounding"]
    if not isinstance(kahan, bool):
        raise ValueError(f"kahan must be a bool, got {kahan!r}")
    if rounding not in PARAM_ROUNDINGS:
        raise ValueError(f"param_rounding must be one of {PARAM_ROUNDINGS}, got {rounding!r}")
    if kahan and rounding == "stochastic":
        raise ValueError("kahan=True with param_rounding='stochastic': both keep small updates of bfloat16 params "
                         "(a compensation buffer, or unbiased rounding); choose one")
    option = "kahan=True" if kahan else "param_rounding='stochastic'" if rounding == "stochastic" else None
    if option is None:
        return
    for p in group["params"]:
        if p.dtype != torch.bfloat16:
            raise ValueError(f"{option} needs bfloat16 parameters (it is how they keep updates below their "
                             f"precision); a parameter of shape {tuple(p.shape)} is {p.dtype}")


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return operator.index(seed)


def compact(group: dict) -> bool:
    return group["state_dtype"] == torch.bfloat16


def stochastic(group: dict) -> bool:
    """The group's calls round something stochastically (its states or its params), so they need keys."""
    return (compact(group) and group["state_rounding"] == "stochastic") or group["param_rounding"] == "stochastic"


def state_dtype(p: Tensor, group: dict) -> torch.dtype:
    """The dtype of the op's states of p (torch.optim's: the param's, unless compact)."""
    return torch.bfloat16 if compact(group) else p.dtype


def buffer_dtype(p: Tensor, group: dict) -> torch.dtype:
    """The dtype of p's kept estimate and copied previous gradient (the compute dtype, unless compact)."""
    return torch.bfloat16 if compact(group) else compute_dtype(p)


def new_compensation(p: Tensor) -> Tensor:
    """A bfloat16 param's Kahan compensation before its first compensated write: zeros of its dtype."""
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def cast_loaded(state: dict, p: Tensor, group: dict, state_keys: Sequence[str]) -> None:
    """A loaded state's tensors in the group's dtypes (torch.optim has cast them to the param's dtype); a
    compensation dropped where the group does not write its params by Kahan's summation."""
    if not group["kahan"]:
        state.pop("compensation", None)
    if not compact(group):
        return
    for key, value in state.items():
        if key not in ("step", "compensation") and isinstance(value, Tensor) and value.is_floating_point():
            state[key] = value.to(state_dtype(p, group) if key in state_keys else buffer_dtype(p, group))


def keys(seed: int, step: int | Tensor, indices: Sequence[int], columns: int, device: torch.device,
         cache: dict[tuple, Tensor]) -> Tensor:
    """The op's rounding_keys (int64 [len(indices), columns] on device) for params of these indices at this
    step, the count it makes: a host int, or in device mode the count tensor, which no host reads
    (rounding.keys_at); the keys are then made on its device."""
    where = step.device if isinstance(step, Tensor) else torch.device("cpu")
    return keys_at(seed, step, _key_tensors(indices, columns, where, cache)).to(device)


def _key_tensors(indices: Sequence[int], columns: int, device: torch.device, cache: dict[tuple, Tensor]) -> Tensor:
    """tensor_key's `tensor` for each key column of params of these indices, int64 [len(indices), columns] on
    device, made once for the cache: a step that a CUDA graph captures must not copy from the host. A traced
    step makes them in its graph (constants there): a cache filled while tracing would make it recompile."""
    key = (tuple(indices), columns, device)
    tensors = cache.get(key)
    if tensors is None:
        tensors = (torch.tensor(indices, dtype=torch.int64)[:, None] * SLOTS + torch.arange(columns)).to(device)
        if not torch.compiler.is_compiling():
            cache[key] = tensors
    return tensors
