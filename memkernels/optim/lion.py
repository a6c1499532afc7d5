"""mk.Lion: lion-pytorch's Lion, Lion-K with a smooth sign, and the correction of docs/THEORY.md section 4."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .._ops import CORRECTION_LIMIT, check_hyperparameters
from ..ops import SPECS
from ._base import MemoryOptimizer, check_betas
from ._schedule import LionSchedule


class Lion(MemoryOptimizer):
    """Lion (sign) or Lion-K (smooth sign phi(x) = x / sqrt(x^2 + smoothing)) with the memory correction.

    With smoothing=0 (lion-pytorch's Lion) the memory correction is exactly zero wherever c is nonzero: Lion's
    memory does not (anti-)regularize, and memory_stats() reports the fraction of coordinates where
    sign(c) != sign(g) instead (docs/THEORY.md section 4).

    Args:
        params (iterable): the parameters to optimize, or dicts that define param groups; every argument but
            track_memory and backend may be set per group.
        lr (float or Tensor, optional): the step size; a one-element tensor is read on the host except in device
            mode (default: 1e-4).
        betas (tuple[float, float], optional): beta1 mixes the EMA m with the gradient in the step's input
            c = beta1 m + (1 - beta1) g; beta2 is the EMA's decay rate (default: (0.9, 0.99)).
        weight_decay (float, optional): lambda, decoupled: p <- p (1 - lr lambda) (default: 0.0).
        smoothing (float, optional): s: 0 steps with sign(c); s > 0 with phi(c), which acts as a sign only where
            |c| >> sqrt(s); below that it shrinks the step to |c| / sqrt(s) of Lion's. Choose sqrt(s) about 1% of the
            typical |W g| per element (W = 1 - beta1 beta2^n), e.g. 1e-12 for gradients of 1e-5 to 1e-3
            (README, "Lion's smoothing") (default: 0.0).
    """

    op = "lion"
    state_keys = SPECS["lion"].state_keys
    schedule = LionSchedule

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, smoothing: float = 0.0, memory_correction: float = 0.0,
                 correction_limit: float = CORRECTION_LIMIT, hvp: str = "auto", hvp_every: int = 1,
                 track_memory: bool | int = False, maximize: bool = False, memoryless: bool = False,
                 capturable: bool = False, backend: str = "auto", state_dtype: torch.dtype = torch.float32,
                 state_rounding: str = "stochastic", seed: int = 0, kahan: bool = False,
                 param_rounding: str = "nearest") -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, smoothing=smoothing,
                        memory_correction=memory_correction, correction_limit=correction_limit, hvp=hvp,
                        hvp_every=hvp_every, maximize=maximize, memoryless=memoryless, capturable=capturable)
        super().__init__(params, defaults, track_memory=track_memory, backend=backend, state_dtype=state_dtype,
                         state_rounding=state_rounding, seed=seed, kahan=kahan,
                         param_rounding=param_rounding)

    def check_group(self, group: dict) -> None:
        super().check_group(group)
        beta1, beta2 = check_betas(group["betas"])
        check_hyperparameters(beta1=beta1, beta2=beta2,
                              weight_decay=group["weight_decay"], smoothing=group["smoothing"])

    def static_kwargs(self, group: dict) -> dict[str, Any]:
        beta1, beta2 = (float(b) for b in group["betas"])
        return dict(beta1=beta1, beta2=beta2, weight_decay=float(group["weight_decay"]),
                    smoothing=float(group["smoothing"]))

    def direction(self, kwargs: dict[str, Any], p: Tensor, g: Tensor) -> Tensor:
        return SPECS["lion"].direction(p, g, weight_decay=kwargs["weight_decay"], smoothing=kwargs["smoothing"],
                                       ema_weight=kwargs["ema_weight"])

    def penalty_prefactor(self, group: dict, kwargs: dict[str, Any]) -> float:
        """R = h (C_n / W_n^2) sum sqrt((W_n g)^2 + eps) for the smooth sign; 0 for sign (M = 0).

        To first order in h the memoryless flow -(phi(W g) + h M) is phi(W grad(L + R)): Lion-K on the
        modified loss (docs/THEORY.md section 4).
        """
        if kwargs["smoothing"] == 0.0:
            return 0.0
        return kwargs["lr"] * kwargs["age_weight"] / kwargs["ema_weight"] ** 2
