"""mk.SGD: torch.optim.SGD (heavy ball or Nesterov, dampening 0) plus the correction of docs/THEORY.md section 2."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .._ops import CORRECTION_LIMIT, check_hyperparameters
from ..ops import SPECS
from ._base import MemoryOptimizer
from ._schedule import SGDSchedule


class SGD(MemoryOptimizer):
    """SGD with heavy-ball or Nesterov momentum (dampening 0) whose memory regularizes.

    The implicit penalty is R = lr c_n / (2 S_n) ||grad L~||^2 (docs/THEORY.md section 2); memory_correction=0
    is torch.optim.SGD with the same momentum, -1 cancels R.

    Args:
        params (iterable): the parameters to optimize, or dicts that define param groups; every argument but
            track_memory and backend may be set per group.
        lr (float or Tensor, optional): the step size; a one-element tensor is read on the host except in device
            mode (default: 1e-2).
        momentum (float, optional): mu, the heavy-ball coefficient; 0 is plain SGD without a buffer. Unlike
            torch.optim.SGD's, the default is nonzero (default: 0.9).
        weight_decay (float, optional): lambda, L2 as in torch.optim.SGD: lambda p added to the gradient
            (default: 0.0).
        nesterov (bool, optional): Nesterov momentum; needs momentum > 0 (default: False).
    """

    op = "sgd"
    state_keys = SPECS["sgd"].state_keys
    optional_state_keys = SPECS["sgd"].optional_state_keys
    schedule = SGDSchedule

    def __init__(self, params: Iterable, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, *, memory_correction: float = 0.0,
                 correction_limit: float = CORRECTION_LIMIT, hvp: str = "auto", hvp_every: int = 1,
                 track_memory: bool | int = False, maximize: bool = False, memoryless: bool = False,
                 capturable: bool = False, backend: str = "auto", state_dtype: torch.dtype = torch.float32,
                 state_rounding: str = "stochastic", seed: int = 0, kahan: bool = False,
                 param_rounding: str = "nearest") -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        memory_correction=memory_correction, correction_limit=correction_limit, hvp=hvp,
                        hvp_every=hvp_every, maximize=maximize, memoryless=memoryless, capturable=capturable)
        super().__init__(params, defaults, track_memory=track_memory, backend=backend, state_dtype=state_dtype,
                         state_rounding=state_rounding, seed=seed, kahan=kahan,
                         param_rounding=param_rounding)

    def check_group(self, group: dict) -> None:
        super().check_group(group)
        check_hyperparameters(momentum=group["momentum"], weight_decay=group["weight_decay"])
        if group["nesterov"] and group["momentum"] == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")

    def static_kwargs(self, group: dict) -> dict[str, Any]:
        return dict(momentum=float(group["momentum"]), weight_decay=float(group["weight_decay"]),
                    nesterov=bool(group["nesterov"]))

    def direction(self, kwargs: dict[str, Any], p: Tensor, g: Tensor) -> Tensor:
        return SPECS["sgd"].direction(p, g, weight_decay=kwargs["weight_decay"])

    def penalty_prefactor(self, group: dict, kwargs: dict[str, Any]) -> float:
        return kwargs["lr"] * kwargs["memory_coef"] / kwargs["update_scale"]
