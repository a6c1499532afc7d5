"""The executable spec: per-element math of every fused step, in plain torch.

Each function takes one tensor's worth of values in the compute dtype (fp32, or
fp64 for fp64 params) and returns the new values; backends/reference.py loops
over tensors and writes them back. Every kernel (numba, Triton, CUDA) mirrors
these functions line by line with the same names.

Notation (docs/THEORY.md): g is the loss gradient after unscaling and the
maximize sign; F is the update with memory, u = F(theta, ..., theta) the
memoryless update, hvp the estimate of H d for the memoryless direction d
(estimate_hvp, or a kept estimate), M the memory correction, and the parameter
moves by -lr * (F + correction * lr * M) (or u in place of F in memoryless
mode), with the correction term limited to correction_limit * lr * |F| (|u|)
per element (docs/THEORY.md section 9).

The probe estimate of H d takes two passes: probe() moves theta to
theta + tau * d and keeps theta in an origin buffer; the step then reads theta
from the origin (backends/reference.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Per-group diagnostics, reduced in the same pass: slots of the diagnostics tensor.
DIAGNOSTICS = ("update_sq", "correction_sq", "memory_sq", "residual_sq", "penalty_sum", "sign_flips", "limited")
NDIAG = len(DIAGNOSTICS)


class Step(NamedTuple):
    """What one element's step produces: new values and its diagnostic terms."""

    p: Tensor
    states: tuple[Tensor, ...]
    g: Tensor  # the processed gradient, stored as the next trajectory reference
    M: Tensor  # the memory correction (tests and the theory engine read it)
    diag: tuple[Tensor, ...]  # one term per DIAGNOSTICS slot


class Probe(NamedTuple):
    """What one element's probe pass produces: theta + tau d, and its terms of the norms that set tau."""

    p: Tensor
    theta_sq: Tensor
    d_sq: Tensor


def compute_dtype(t: Tensor) -> torch.dtype:
    """fp64 tensors are computed in fp64, every other dtype in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def inv_scale(grad_scale: Tensor | None) -> float:
    """AMP's unscaling factor for load_grad (1 without a scaler)."""
    return 1.0 if grad_scale is None else 1.0 / grad_scale.item()


def load_grad(grad: Tensor, inv_scale: float, maximize: bool) -> Tensor:
    """Unscale (AMP) and orient the raw gradient so that the optimizer descends."""
    g = grad * inv_scale if inv_scale != 1.0 else grad
    return -g if maximize else g


def estimate_hvp(g_ref: Tensor, g: Tensor, hvp_scale: float) -> Tensor:
    """H d from two gradients: (g(theta + tau d) - g) / tau (probe), (g + H d) - g (exact), or the
    trajectory's (g_{n-1} - g_n) / (lr_{n-1} r)."""
    return (g_ref - g) * hvp_scale


def descend(p: Tensor, step: Tensor, M: Tensor, update: Tensor, s: dict[str, float], correct: bool
            ) -> tuple[Tensor, Tensor]:
    """p <- p * shrink - step_size * step - term, term = correction * lr^2 * M limited to kappa lr |update|.

    s holds the op's derived scalars (its derive()); correct: correction != 0. update is what the step
    applies without the correction (F, or u in memoryless mode), so the corrected step is that step times a
    factor in [1 - kappa, 1 + kappa] per element. Returns p and the elements where the limit acted. A NaN
    term is not limited (it propagates).
    """
    if s["shrink"] != 1.0:
        p = p * s["shrink"]
    p = p - s["step_size"] * step
    limited = torch.zeros_like(p, dtype=torch.bool)
    if correct:
        term = s["correction_lr2"] * M
        bound = s["kappa_lr"] * torch.abs(update)
        limited = torch.abs(term) > bound
        term = torch.where(limited, torch.where(term < 0, -bound, bound), term)
        p = p - term
    return p, limited


def correction_scalars(lr: float, correction: float, correction_limit: float) -> dict[str, float]:
    """The correction's derived scalars, shared by every op's derive()."""
    return dict(correction_lr2=correction * lr * lr, kappa_lr=correction_limit * lr)


def diagnostics(F, u, M, lr, penalty, sign_flips, limited):
    hM = lr * M
    memory = F - u
    residual = memory - hM
    return (F * F, hM * hM, memory * memory, residual * residual, penalty, sign_flips, limited.to(F.dtype))


def probe(p: Tensor, d: Tensor, tau: float) -> Probe:
    """The probe pass: theta + tau d (the caller keeps theta), and theta^2, d^2 for the next tau."""
    return Probe(p + tau * d, p * p, d * d)


def decay_term(weight_decay: float, p: Tensor) -> Tensor | float:
    """weight_decay * p, or 0 when weight_decay == 0: 0 * inf is NaN, and torch.optim skips the term there."""
    return weight_decay * p if weight_decay != 0 else 0.0


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


def sgd(p: Tensor, g: Tensor, momentum_buffer: Tensor | None, hvp: Tensor | None, *,
        lr: float, momentum: float, weight_decay: float, nesterov: bool,
        update_scale: float, memory_coef: float, correction: float, correction_limit: float,
        memoryless: bool) -> Step:
    """Heavy-ball or Nesterov SGD (coupled decay, dampening 0) and the correction of section 2."""
    g_raw = g
    g = g + decay_term(weight_decay, p)  # g~
    states: tuple[Tensor, ...] = ()
    if momentum_buffer is None:
        F = g
    else:
        momentum_buffer = momentum * momentum_buffer + g
        F = g + momentum * momentum_buffer if nesterov else momentum_buffer
        states = (momentum_buffer,)
    u = update_scale * g
    if hvp is None:
        M = torch.zeros_like(p)
    else:
        hvp = hvp + weight_decay * g  # H~ g~ = H g~ + lambda g~
        M = memory_coef * hvp
    s = sgd_derived(lr=lr, correction=correction, correction_limit=correction_limit)
    p, limited = descend(p, u if memoryless else F, M, u if memoryless else F, s, correction != 0.0)
    diag = diagnostics(F, u, M, lr, 0.5 * g * g, torch.zeros_like(p), limited)
    return Step(p, states, g_raw, M, diag)


def sgd_derived(*, lr: float, correction: float, correction_limit: float, **_: object) -> dict[str, float]:
    return dict(shrink=1.0, step_size=lr, **correction_scalars(lr, correction, correction_limit))


# Memoryless directions d = F(theta, ..., theta) whose H d the correction needs: the probe pass and
# the exact HVP evaluate them (the fused steps above compute the same u inline).

def adamw_direction(p: Tensor, g: Tensor, *, eps: float, weight_decay: float, decoupled: bool,
                    eps_inside_sqrt: bool, **_: object) -> Tensor:
    """g / a + decay, in place on a where the values are the same: each full-size temporary is a fresh
    allocation, and its first-touch page faults cost more than the arithmetic."""
    if not decoupled:
        g = g + decay_term(weight_decay, p)
    a = (g * g).add_(eps).sqrt_() if eps_inside_sqrt else torch.abs(g).add_(eps)
    u = torch.div(g, a, out=a)
    return u.add_(decay_term(weight_decay, p)) if decoupled else u


def lion_direction(p: Tensor, g: Tensor, *, weight_decay: float, smoothing: float, ema_weight: float,
                   **_: object) -> Tensor:
    return smooth_sign(ema_weight * g, smoothing).add_(decay_term(weight_decay, p))  # in place: see adamw_direction


def sgd_direction(p: Tensor, g: Tensor, *, weight_decay: float, **_: object) -> Tensor:
    """H~ is applied to g~ itself (M = c_n H~ g~), so d = g~ without the factor S_n."""
    return g + decay_term(weight_decay, p)

