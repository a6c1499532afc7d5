"""mk.SGD: torch.optim.SGD (heavy ball or Nesterov, dampening 0) plus the correction of docs/THEORY.md section 2."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .._ops import CORRECTION_LIMIT, check_hyperparameters
from ..coefficients import HeavyBall, heavy_ball_at
from ..ops import SPECS
from ._base import MemoryOptimizer


class SGD(MemoryOptimizer):
    """SGD with momentum whose memory regularizes: R = h c_n / (2 S_n) ||grad L~||^2 (shared keywords: see
    MemoryOptimizer)."""

    op = "sgd"
    state_keys = SPECS["sgd"].state_keys
    optional_state_keys = SPECS["sgd"].optional_state_keys

    def __init__(self, params: Iterable, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, *, memory_correction: float = 0.0,
                 correction_limit: float = CORRECTION_LIMIT, hvp: str = "auto", hvp_every: int = 1,
                 track_memory: bool = False, maximize: bool = False, memoryless: bool = False,
                 capturable: bool = False, backend: str = "auto") -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        memory_correction=memory_correction, correction_limit=correction_limit, hvp=hvp,
                        hvp_every=hvp_every, maximize=maximize, memoryless=memoryless, capturable=capturable)
        super().__init__(params, defaults, track_memory=track_memory, backend=backend)

    def check_group(self, group: dict) -> None:
        super().check_group(group)
        check_hyperparameters(momentum=group["momentum"], weight_decay=group["weight_decay"])
        if group["nesterov"] and group["momentum"] == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")

    def new_state(self, p: Tensor, group: dict) -> dict[str, Tensor]:
        state = {"step": self.new_step(p, group)}
        if group["momentum"] != 0.0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _heavy_ball(self, group: dict, gi: int, n: int) -> HeavyBall:
        momentum, nesterov = float(group["momentum"]), bool(group["nesterov"])
        return self.track(gi, ("sgd", momentum, nesterov), lambda: HeavyBall(momentum, nesterov), n)

    def static_kwargs(self, group: dict) -> dict[str, Any]:
        return dict(momentum=float(group["momentum"]), weight_decay=float(group["weight_decay"]),
                    nesterov=bool(group["nesterov"]))

    def coefficients(self, group: dict, gi: int, n: int) -> dict[str, float]:
        hb = self._heavy_ball(group, gi, n)
        return dict(update_scale=hb.update_scale, memory_coef=hb.c)

    def coefficients_at(self, group: dict, n: Tensor) -> dict[str, Tensor]:
        update_scale, memory_coef, _ = heavy_ball_at(float(group["momentum"]), bool(group["nesterov"]), n)
        return dict(update_scale=update_scale, memory_coef=memory_coef)

    def direction(self, kwargs: dict[str, Any], p: Tensor, g: Tensor) -> Tensor:
        return SPECS["sgd"].direction(p, g, weight_decay=kwargs["weight_decay"])

    def trajectory_ratio(self, group: dict, gi: int, n: int) -> float:
        """The previous update was ~ S_{n-1} g~ (heavy ball) or S_n g~ (Nesterov)."""
        hb = self._heavy_ball(group, gi, n)
        return hb.s if hb.nesterov else hb.s_prev

    def trajectory_ratio_at(self, group: dict, n: Tensor) -> Tensor:
        return heavy_ball_at(float(group["momentum"]), bool(group["nesterov"]), n)[2]

    def penalty_prefactor(self, group: dict, kwargs: dict[str, Any]) -> float:
        return kwargs["lr"] * kwargs["memory_coef"] / kwargs["update_scale"]
