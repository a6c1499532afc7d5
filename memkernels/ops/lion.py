"""Lion and Lion-K with a smooth sign: spec and reference math (docs/THEORY.md section 4)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import Step, correction_scalars, decay_term, descend, diagnostics
from .spec import BETA, FRACTION, NONNEGATIVE, OpSpec, Scalar, State


def smooth_sign(x: Tensor, smoothing: float) -> Tensor:
    """phi_eps(x) = x / sqrt(x^2 + eps); eps = 0 is sign(x)."""
    return torch.sign(x) if smoothing == 0.0 else x / torch.sqrt(x * x + smoothing)


def smooth_sign_slope(x: Tensor, smoothing: float) -> Tensor:
    """phi'_eps(x) = eps / (x^2 + eps)^(3/2); zero for sign, away from x = 0."""
    if smoothing == 0.0:
        return torch.zeros_like(x)
    s = x * x + smoothing
    return smoothing / (s * torch.sqrt(s))


def lion(p: Tensor, g: Tensor, exp_avg: Tensor, hvp: Tensor | None, *,
         lr: float, beta1: float, beta2: float, weight_decay: float, smoothing: float,
         ema_weight: float, age_weight: float, correction: float, correction_limit: float,
         memoryless: bool) -> Step:
    """Lion (sign) or Lion-K with a smooth sign, and the correction of docs/THEORY.md section 4."""
    s = lion_derived(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, correction=correction,
                     correction_limit=correction_limit)
    c = beta1 * exp_avg + s["one_minus_beta1"] * g
    wg = ema_weight * g  # W_n g: c_n with every past gradient replaced by the current one
    decay = decay_term(weight_decay, p)
    phi_c = smooth_sign(c, smoothing)
    phi_wg = smooth_sign(wg, smoothing)
    F = phi_c + decay
    u = phi_wg + decay
    if hvp is None:
        M = torch.zeros_like(p)
    else:
        M = smooth_sign_slope(wg, smoothing) * age_weight * hvp
    exp_avg = beta2 * exp_avg + s["one_minus_beta2"] * g
    penalty = torch.sqrt(wg * wg + smoothing)
    sign_flips = (torch.sign(c) != torch.sign(g)).to(p.dtype)
    p, limited = descend(p, phi_wg if memoryless else phi_c, M, u if memoryless else F, s, correction != 0.0)
    diag = diagnostics(F, u, M, lr, penalty, sign_flips, limited)
    return Step(p, (exp_avg,), g, M, diag)


def lion_derived(*, lr: float, beta1: float, beta2: float, weight_decay: float, correction: float,
                 correction_limit: float, **_: object) -> dict[str, float]:
    return dict(one_minus_beta1=1 - beta1, one_minus_beta2=1 - beta2, shrink=1 - lr * weight_decay, step_size=lr,
                **correction_scalars(lr, correction, correction_limit))


def lion_direction(p: Tensor, g: Tensor, *, weight_decay: float, smoothing: float, ema_weight: float,
                   **_: object) -> Tensor:
    return smooth_sign(ema_weight * g, smoothing).add_(decay_term(weight_decay, p))  # in place: see adamw_direction


SPEC = OpSpec(
    "lion", (State("exp_avg"),),
    (Scalar("lr", NONNEGATIVE, per_step=True, example=1e-3), Scalar("beta1", BETA, example=0.9),
     Scalar("beta2", BETA, example=0.99), Scalar("weight_decay", NONNEGATIVE, example=0.1),
     Scalar("smoothing", NONNEGATIVE, example=0.0, variants=(0.01,)),
     Scalar("ema_weight", FRACTION, per_step=True, example=0.95),
     Scalar("age_weight", NONNEGATIVE, per_step=True, example=2.0)),
    lion, lion_direction, lion_derived)
