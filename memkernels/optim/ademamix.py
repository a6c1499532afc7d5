"""mk.AdEMAMix: AdEMAMix (Pagliardini, Ablin and Grangier 2024) plus the memory correction of docs/THEORY.md
section 10."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from .._ops import CORRECTION_LIMIT, check_hyperparameters
from ..coefficients import geometric
from ..ops import SPECS, ademamix
from ._base import MemoryOptimizer
from ._schedule import Schedule


class AdEMAMixSchedule(Schedule):
    """Bias corrections, the slow EMA's alpha, beta3 and weight sum, and the three EMAs' ages (ops/ademamix.py).
    The previous memoryless step was c_{n-1} g / a against this one's c_n g / a: the trajectory ratio."""

    def host(self, group: dict, gi: int, n: int) -> dict[str, float]:
        beta1, beta2, beta3 = (float(b) for b in group["betas"])
        key = (beta1, beta2, beta3, float(group["alpha"]), group["alpha_warmup"], group["beta3_warmup"])

        def track(at: int) -> ademamix.AdEMAMixAges:
            return self.track(gi, ("ademamix", *key), lambda: ademamix.AdEMAMixAges(*key), at)

        ages = track(n)
        before = track(n - 1) if n > 0 else ages
        return dict(bias_correction1=ages.bias_correction1, bias_correction2=ages.bias_correction2,
                    alpha=ages.alpha_n, beta3=ages.beta3_n, slow_sum=ages.slow_sum, mean_age1=ages.mean_age1,
                    mean_age2=ages.mean_age2, slow_age=ages.slow_age,
                    trajectory_ratio=before.update_scale / ages.update_scale)

    def device(self, group: dict, n: Tensor) -> dict[str, Tensor | float]:
        beta1, beta2, beta3 = (float(b) for b in group["betas"])
        alpha = float(group["alpha"])
        z1, z2, s, a1, a2, y3 = ademamix.ademamix_ages_at(beta1, beta2, beta3, alpha, n)
        s_before = (1.0 - beta3) * geometric(beta3, n)  # S_{n-1}, 0 at n = 0
        ratio = torch.where(n > 0, (1.0 + alpha * s_before) / (1.0 + alpha * s), 1.0)
        return dict(bias_correction1=z1, bias_correction2=z2, alpha=torch.full_like(n, alpha),
                    beta3=torch.full_like(n, beta3), slow_sum=s, mean_age1=a1, mean_age2=a2, slow_age=y3,
                    trajectory_ratio=ratio)


class AdEMAMix(MemoryOptimizer):
    """AdEMAMix with memory correction: AdamW's fast EMA m1 and second moment v, plus a slow EMA m2 of the
    gradients mixed into the numerator with weight alpha (docs/THEORY.md section 10).

    The step is p <- p (1 - lr lambda) - lr (m1 / (1 - beta1^t) + alpha m2) / (sqrt(v / (1 - beta2^t)) + eps),
    with m2 not bias corrected, as in the paper; memory_correction=0 steps as pytorch-optimizer's AdEMAMix with
    weight_decouple=True. Unlike AdamW's, AdEMAMix's memory regularizes once the slow EMA is old enough (its
    penalty prefactor turns positive: section 10).

    Args:
        params (iterable): parameters or param groups to optimize.
        lr (float or Tensor, optional): the step size h (default: 1e-3).
        betas (tuple of three floats, optional): the fast EMA's beta1, the second moment's beta2 and the slow
            EMA's beta3 (default: (0.9, 0.999, 0.9999)).
        alpha (float, optional): the slow EMA's weight in the numerator (default: 5.0).
        eps (float, optional): added to the bias-corrected sqrt(v) (default: 1e-8).
        weight_decay (float, optional): decoupled weight decay lambda (default: 0.0).
        alpha_warmup (float, optional): T_alpha, steps over which alpha rises linearly from 0 (the paper's
            scheduler); None: no warm-up (default: None).
        beta3_warmup (float, optional): T_beta3, steps over which beta3 rises from beta1 (the paper's scheduler);
            None: no warm-up (default: None). The warm-ups need host mode (capturable=False, no torch.compile of
            the step): their coefficients have no closed form for a step count on the device.
    """

    op = "ademamix"
    state_keys = SPECS["ademamix"].state_keys
    schedule = AdEMAMixSchedule

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 alpha: float = 5.0, eps: float = 1e-8, weight_decay: float = 0.0, *,
                 alpha_warmup: float | None = None, beta3_warmup: float | None = None, memory_correction: float = 0.0,
                 correction_limit: float = CORRECTION_LIMIT, hvp: str = "auto", hvp_every: int = 1,
                 track_memory: bool | int = False, maximize: bool = False, memoryless: bool = False,
                 capturable: bool = False, backend: str = "auto", state_dtype: torch.dtype = torch.float32,
                 state_rounding: str = "stochastic", seed: int = 0, kahan: bool = False,
                 param_rounding: str = "nearest") -> None:
        defaults = dict(lr=lr, betas=betas, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        alpha_warmup=alpha_warmup, beta3_warmup=beta3_warmup, memory_correction=memory_correction,
                        correction_limit=correction_limit, hvp=hvp, hvp_every=hvp_every, maximize=maximize,
                        memoryless=memoryless, capturable=capturable)
        super().__init__(params, defaults, track_memory=track_memory, backend=backend, state_dtype=state_dtype,
                         state_rounding=state_rounding, seed=seed, kahan=kahan,
                         param_rounding=param_rounding)

    def check_group(self, group: dict) -> None:
        super().check_group(group)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 3:
            raise ValueError(f"betas must be a tuple of three floats (beta1, beta2, beta3), got {betas!r}")
        check_hyperparameters(beta1=betas[0], beta2=betas[1], beta3=betas[2], alpha=group["alpha"],
                              eps=group["eps"], weight_decay=group["weight_decay"])
        for name in ("alpha_warmup", "beta3_warmup"):
            value = group[name]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not (math.isfinite(value) and value > 0)):
                raise ValueError(f"{name} must be None or a finite number of steps > 0, got {value!r}")
        if group["beta3_warmup"] is not None and 0.0 in (float(betas[0]), float(betas[2])):
            raise ValueError("beta3_warmup interpolates 1/log(beta1) and 1/log(beta3): beta1 and beta3 must be > 0")
        if group["capturable"] and (group["alpha_warmup"] is not None or group["beta3_warmup"] is not None):
            raise ValueError("capturable=True cannot take alpha_warmup or beta3_warmup: with a warm-up the "
                             "coefficients have no closed form for a step count on the device")

    def static_kwargs(self, group: dict) -> dict[str, Any]:
        beta1, beta2, _ = (float(b) for b in group["betas"])
        return dict(beta1=beta1, beta2=beta2, eps=float(group["eps"]), weight_decay=float(group["weight_decay"]))

    def direction(self, kwargs: dict[str, Any], p: Tensor, g: Tensor) -> Tensor:
        return SPECS["ademamix"].direction(p, g, eps=kwargs["eps"], weight_decay=kwargs["weight_decay"],
                                           alpha=kwargs["alpha"], slow_sum=kwargs["slow_sum"])

    def penalty_prefactor(self, group: dict, kwargs: dict[str, Any]) -> float:
        return ademamix.penalty_prefactor(kwargs["lr"], kwargs["alpha"], kwargs["slow_sum"], kwargs["mean_age1"],
                                          kwargs["mean_age2"], kwargs["slow_age"])
