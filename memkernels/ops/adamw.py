"""AdamW (decoupled) and Adam with L2 (coupled): spec and reference math (docs/THEORY.md section 3)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import Step, correction_scalars, decay_term, descend, diagnostics
from .spec import BETA, FRACTION, NONNEGATIVE, POSITIVE, OpSpec, Scalar, State


def adamw(p: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, hvp: Tensor | None, *,
          lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
          bias_correction1: float, bias_correction2: float, mean_age1: float, mean_age2: float,
          correction: float, correction_limit: float, decoupled: bool, eps_inside_sqrt: bool,
          memoryless: bool) -> Step:
    """AdamW (decoupled) or Adam with L2 (coupled) and the correction of docs/THEORY.md section 3."""
    s = adamw_derived(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, bias_correction1=bias_correction1,
                      bias_correction2=bias_correction2, decoupled=decoupled, memoryless=memoryless,
                      correction=correction, correction_limit=correction_limit)
    g_raw = g
    if not decoupled:
        g = g + decay_term(weight_decay, p)  # coupled L2: the EMAs see g~ = g + lambda theta
    exp_avg = exp_avg + s["one_minus_beta1"] * (g - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + s["one_minus_beta2"] * g * g
    decay = decay_term(weight_decay, p) if decoupled else torch.zeros_like(p)
    if eps_inside_sqrt:
        denom = torch.sqrt(exp_avg_sq / bias_correction2 + eps)
        a = torch.sqrt(g * g + eps)
        g_over_a = g / a
        # A/a - B g^2/a^3 without a^3 to overflow; factored as below, it makes the fp64 CUDA kernel spill
        coef = mean_age1 / a - mean_age2 * (g_over_a * g_over_a) / a
        penalty = a
    else:
        denom = torch.sqrt(exp_avg_sq) / s["bias_correction2_sqrt"] + eps
        a = torch.abs(g) + eps
        g_over_a = g / a
        coef = (mean_age1 - mean_age2 * torch.abs(g_over_a)) / a  # A/a - B |g|/a^2 without a^2 to overflow
        penalty = torch.abs(g) - eps * torch.log1p(torch.abs(g) / eps)
    F = exp_avg / bias_correction1 / denom + decay
    u = g_over_a + decay
    if hvp is None:
        M = torch.zeros_like(p)
    else:
        if not decoupled:
            hvp = hvp + weight_decay * u  # H~ = H + lambda I
        M = coef * hvp
    if memoryless:
        p, limited = descend(p, g_over_a, M, u, s, correction != 0.0)
    else:
        p, limited = descend(p, exp_avg / denom, M, F, s, correction != 0.0)
    diag = diagnostics(F, u, M, lr, penalty, torch.zeros_like(p), limited)
    return Step(p, (exp_avg, exp_avg_sq), g_raw, M, diag)


def adamw_derived(*, lr: float, beta1: float, beta2: float, weight_decay: float, bias_correction1: float,
                  bias_correction2: float, decoupled: bool, memoryless: bool, correction: float,
                  correction_limit: float, **_: object) -> dict[str, float]:
    return dict(one_minus_beta1=1 - beta1, one_minus_beta2=1 - beta2,
                bias_correction2_sqrt=bias_correction2 ** 0.5, shrink=1 - lr * weight_decay if decoupled else 1.0,
                step_size=lr if memoryless else lr / bias_correction1,
                **correction_scalars(lr, correction, correction_limit))


def adamw_direction(p: Tensor, g: Tensor, *, eps: float, weight_decay: float, decoupled: bool,
                    eps_inside_sqrt: bool, **_: object) -> Tensor:
    """g / a + decay, in place on a where the values are the same: each full-size temporary is a fresh
    allocation, and its first-touch page faults cost more than the arithmetic."""
    if not decoupled:
        g = g + decay_term(weight_decay, p)
    a = (g * g).add_(eps).sqrt_() if eps_inside_sqrt else torch.abs(g).add_(eps)
    u = torch.div(g, a, out=a)
    return u.add_(decay_term(weight_decay, p)) if decoupled else u


SPEC = OpSpec(
    "adamw", (State("exp_avg"), State("exp_avg_sq", squares=True)),
    (Scalar("lr", NONNEGATIVE, per_step=True, example=1e-2), Scalar("beta1", BETA, example=0.9),
     Scalar("beta2", BETA, example=0.999), Scalar("eps", POSITIVE, example=1e-8),
     Scalar("weight_decay", NONNEGATIVE, example=0.1),
     Scalar("bias_correction1", FRACTION, per_step=True, example=0.271),
     Scalar("bias_correction2", FRACTION, per_step=True, example=0.003),
     Scalar("mean_age1", NONNEGATIVE, per_step=True, example=0.63),
     Scalar("mean_age2", NONNEGATIVE, per_step=True, example=1.2),
     Scalar("decoupled", default=True, example=True), Scalar("eps_inside_sqrt", default=False)),
    adamw, adamw_direction, adamw_derived)
