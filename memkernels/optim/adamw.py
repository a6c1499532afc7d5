"""mk.AdamW: torch.optim.AdamW plus the memory correction of docs/THEORY.md section 3."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .._ops import CORRECTION_LIMIT, check_hyperparameters
from ..ops import SPECS
from ._base import MemoryOptimizer, check_betas
from ._schedule import AdamWSchedule


class AdamW(MemoryOptimizer):
    """AdamW (Adam with L2 when decoupled_weight_decay=False) that can measure and correct its memory's effect.

    memory_correction=0 is torch.optim.AdamW, and state_dict keys match torch's, so checkpoints move both
    ways; -1 cancels the implicit anti-regularization of Adam's memory (docs/THEORY.md sections 3 and 6).

    Args:
        params (iterable): the parameters to optimize, or dicts that define param groups; every argument but
            track_memory and backend may be set per group.
        lr (float or Tensor, optional): the step size; a one-element tensor is read on the host except in device
            mode (default: 1e-3).
        betas (tuple[float, float], optional): decay rates of the EMAs of the gradient and of its square
            (default: (0.9, 0.999)).
        eps (float, optional): added to sqrt(v_hat), or to v_hat under the root with eps_inside_sqrt, so the
            division stays finite (default: 1e-8).
        weight_decay (float, optional): lambda: decoupled, p <- p (1 - lr lambda), or L2 (lambda p added to the
            gradient) with decoupled_weight_decay=False (default: 1e-2).
        eps_inside_sqrt (bool, optional): m_hat / sqrt(v_hat + eps), the paper's convention, in place of
            torch's m_hat / (sqrt(v_hat) + eps) (default: False).
        decoupled_weight_decay (bool, optional): False makes it Adam with L2 regularization (default: True).
    """

    op = "adamw"
    state_keys = SPECS["adamw"].state_keys
    schedule = AdamWSchedule

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, eps_inside_sqrt: bool = False,
                 decoupled_weight_decay: bool = True, memory_correction: float = 0.0,
                 correction_limit: float = CORRECTION_LIMIT, hvp: str = "auto", hvp_every: int = 1,
                 track_memory: bool | int = False, maximize: bool = False, memoryless: bool = False,
                 capturable: bool = False, backend: str = "auto", state_dtype: torch.dtype = torch.float32,
                 state_rounding: str = "stochastic", seed: int = 0, kahan: bool = False,
                 param_rounding: str = "nearest") -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, eps_inside_sqrt=eps_inside_sqrt,
                        decoupled_weight_decay=decoupled_weight_decay, memory_correction=memory_correction,
                        correction_limit=correction_limit, hvp=hvp, hvp_every=hvp_every, maximize=maximize,
                        memoryless=memoryless, capturable=capturable)
        super().__init__(params, defaults, track_memory=track_memory, backend=backend, state_dtype=state_dtype,
                         state_rounding=state_rounding, seed=seed, kahan=kahan,
                         param_rounding=param_rounding)

    def check_group(self, group: dict) -> None:
        super().check_group(group)
        beta1, beta2 = check_betas(group["betas"])
        check_hyperparameters(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])

    def static_kwargs(self, group: dict) -> dict[str, Any]:
        beta1, beta2 = (float(b) for b in group["betas"])
        return dict(beta1=beta1, beta2=beta2, eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                    decoupled=bool(group["decoupled_weight_decay"]), eps_inside_sqrt=bool(group["eps_inside_sqrt"]))

    def direction(self, kwargs: dict[str, Any], p: Tensor, g: Tensor) -> Tensor:
        return SPECS["adamw"].direction(p, g, eps=kwargs["eps"], weight_decay=kwargs["weight_decay"],
                                        decoupled=kwargs["decoupled"], eps_inside_sqrt=kwargs["eps_inside_sqrt"])

    def penalty_prefactor(self, group: dict, kwargs: dict[str, Any]) -> float:
        """R = h (A_n - B_n) Psi_eps(g): negative when beta1 < beta2 (anti-regularization)."""
        return kwargs["lr"] * (kwargs["mean_age1"] - kwargs["mean_age2"])
