"""AdEMAMix (Pagliardini, Ablin and Grangier 2024): reference math and its memory correction, docs/THEORY.md
section 10.

The per-element step in the style of the other ops (same Step, descend, diagnostics
and correction limit), so that a kernel can mirror it line by line. The scalars
are the op's step scalars: bias_correction1/2 (1 - beta^(n+1)), alpha and beta3
(their values at step n, the warm-up schedulers applied), slow_sum (S_n, the
slow EMA's weight sum), mean_age1, mean_age2, slow_age (coefficients.AdEMAMixAges).

Conventions (pytorch-optimizer's AdEMAMix, which follows the paper): eps outside
the square root, the slow EMA m2 not bias corrected, decoupled weight decay
scaled by lr (its weight_decouple=True, fixed_decay=False; its default,
weight_decouple=False, adds lambda theta to the gradient instead).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import Step, correction_scalars, decay_term, descend, diagnostics


def ademamix(p: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_slow: Tensor, exp_avg_sq: Tensor, hvp: Tensor | None, *,
             lr: float, beta1: float, beta2: float, beta3: float, alpha: float, eps: float, weight_decay: float,
             bias_correction1: float, bias_correction2: float, slow_sum: float, mean_age1: float, mean_age2: float,
             slow_age: float, correction: float, correction_limit: float, memoryless: bool) -> Step:
    """F = (m1 / Z1 + alpha m2) / (sqrt(v / Z2) + eps) + lambda theta, u = c g / a + lambda theta with
    c = 1 + alpha S_n and a = |g| + eps, M = (A1 + alpha Y3 - c B |g| / a) / a * H u."""
    s = ademamix_derived(lr=lr, beta1=beta1, beta2=beta2, beta3=beta3, weight_decay=weight_decay,
                         bias_correction2=bias_correction2, correction=correction, correction_limit=correction_limit)
    exp_avg = exp_avg + s["one_minus_beta1"] * (g - exp_avg)
    exp_avg_slow = exp_avg_slow + s["one_minus_beta3"] * (g - exp_avg_slow)
    exp_avg_sq = beta2 * exp_avg_sq + s["one_minus_beta2"] * g * g
    decay = decay_term(weight_decay, p)
    denom = torch.sqrt(exp_avg_sq) / s["bias_correction2_sqrt"] + eps
    step = (exp_avg / bias_correction1 + alpha * exp_avg_slow) / denom
    a = torch.abs(g) + eps
    g_over_a = g / a
    scale = 1.0 + alpha * slow_sum  # c_n: m1^ -> g, m2 -> S_n g, v^ -> g^2
    memoryless_step = scale * g_over_a
    F = step + decay
    u = memoryless_step + decay
    if hvp is None:
        M = torch.zeros_like(p)
    else:
        # (A1 + alpha Y3) / a - c B |g| / a^2, without a^2 to overflow (as reference.adamw)
        M = (mean_age1 + alpha * slow_age - scale * mean_age2 * torch.abs(g_over_a)) / a * hvp
    # H u = c grad Psi_eps: psi_eps(g) = |g| - eps log(1 + |g| / eps) is AdamW's potential (section 10)
    penalty = torch.abs(g) - eps * torch.log1p(torch.abs(g) / eps)
    p, limited = descend(p, memoryless_step if memoryless else step, M, u if memoryless else F, s,
                         correction != 0.0)
    diag = diagnostics(F, u, M, lr, penalty, torch.zeros_like(p), limited)
    return Step(p, (exp_avg, exp_avg_slow, exp_avg_sq), g, M, diag)


def ademamix_derived(*, lr: float, beta1: float, beta2: float, beta3: float, weight_decay: float,
                     bias_correction2: float, correction: float, correction_limit: float, **_: object
                     ) -> dict[str, float]:
    return dict(one_minus_beta1=1 - beta1, one_minus_beta2=1 - beta2, one_minus_beta3=1 - beta3,
                bias_correction2_sqrt=bias_correction2 ** 0.5, shrink=1 - lr * weight_decay, step_size=lr,
                **correction_scalars(lr, correction, correction_limit))


def ademamix_direction(p: Tensor, g: Tensor, *, eps: float, weight_decay: float, alpha: float, slow_sum: float,
                       **_: object) -> Tensor:
    """u = c g / (|g| + eps) + lambda theta, c = 1 + alpha S_n; in place on a (see reference.adamw_direction)."""
    a = torch.abs(g).add_(eps)
    u = torch.div(g, a, out=a).mul_(1.0 + alpha * slow_sum)
    return u.add_(decay_term(weight_decay, p))


def penalty_prefactor(lr: float, alpha: float, slow_sum: float, mean_age1: float, mean_age2: float,
                      slow_age: float) -> float:
    """R = h (A1 + alpha Y3 - c B) Psi_eps(g) (leading order in eps / |g|, lambda = 0): positive at the paper's
    betas, i.e. unlike AdamW's, AdEMAMix's memory regularizes (docs/THEORY.md section 10)."""
    return lr * (mean_age1 + alpha * slow_age - (1.0 + alpha * slow_sum) * mean_age2)
