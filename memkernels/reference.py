"""The executable spec: per-element math of every fused step, in plain torch.

Each function takes one tensor's worth of values in the compute dtype (fp32, or
fp64 for fp64 params) and returns the new values; backends/reference.py loops
over tensors and writes them back. Every kernel (numba, Triton, CUDA) mirrors
these functions line by line with the same names.

Notation (THEORY.md): g is the loss gradient after unscaling and the maximize
sign; F is the update with memory, u = F(theta, ..., theta) the memoryless
update, hvp the Hessian-vector estimate (g_ref - g) * hvp_scale of H d for the
memoryless direction d, M the memory correction, and the parameter moves by
-lr * (F + correction * lr * M) (or u in place of F in memoryless mode).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Per-group diagnostics, reduced in the same pass: slots of the diagnostics tensor.
DIAGNOSTICS = ("update_sq", "correction_sq", "memory_sq", "residual_sq", "penalty_sum", "sign_flips")
NDIAG = len(DIAGNOSTICS)


class Step(NamedTuple):
    """What one element's step produces: new values and its diagnostic terms."""

    p: Tensor
    states: tuple[Tensor, ...]
    g: Tensor  # the processed gradient, stored as the next trajectory reference
    M: Tensor  # the memory correction (tests and the theory engine read it)
    diag: tuple[Tensor, ...]  # one term per DIAGNOSTICS slot


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


def descend(p: Tensor, shrink: float, step_size: float, step: Tensor, M: Tensor, lr: float,
            correction: float) -> Tensor:
    """p <- p * shrink - step_size * step - correction * lr^2 * M."""
    if shrink != 1.0:
        p = p * shrink
    p = p - step_size * step
    if correction != 0.0:
        p = p - (correction * lr * lr) * M
    return p


def diagnostics(F, u, M, lr, penalty, sign_flips):
    hM = lr * M
    memory = F - u
    residual = memory - hM
    return (F * F, hM * hM, memory * memory, residual * residual, penalty, sign_flips)


def adamw(p: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, g_ref: Tensor | None, *,
          lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
          bias_correction1: float, bias_correction2: float, mean_age1: float, mean_age2: float,
          correction: float, hvp_scale: float, decoupled: bool, eps_inside_sqrt: bool,
          memoryless: bool) -> Step:
    """AdamW (decoupled) or Adam with L2 (coupled) and the correction of THEORY.md section 3."""
    g_raw = g
    if not decoupled:
        g = g + weight_decay * p  # coupled L2: the EMAs see g~ = g + lambda theta
    exp_avg = exp_avg + (1 - beta1) * (g - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    decay = weight_decay * p if decoupled else torch.zeros_like(p)
    if eps_inside_sqrt:
        denom = torch.sqrt(exp_avg_sq / bias_correction2 + eps)
        a = torch.sqrt(g * g + eps)
        g_over_a = g / a
        # A/a - B g^2/a^3 without a^3 to overflow; factored as below, it makes the fp64 CUDA kernel spill
        coef = mean_age1 / a - mean_age2 * (g_over_a * g_over_a) / a
        penalty = a
    else:
        denom = torch.sqrt(exp_avg_sq) / bias_correction2 ** 0.5 + eps
        a = torch.abs(g) + eps
        g_over_a = g / a
        coef = (mean_age1 - mean_age2 * torch.abs(g_over_a)) / a  # A/a - B |g|/a^2 without a^2 to overflow
        penalty = torch.abs(g) - eps * torch.log1p(torch.abs(g) / eps)
    F = exp_avg / bias_correction1 / denom + decay
    u = g_over_a + decay
    if g_ref is None:
        M = torch.zeros_like(p)
    else:
        hvp = (g_ref - g_raw) * hvp_scale
        if not decoupled:
            hvp = hvp + weight_decay * u  # H~ = H + lambda I
        M = coef * hvp
    diag = diagnostics(F, u, M, lr, penalty, torch.zeros_like(p))
    shrink = 1 - lr * weight_decay if decoupled else 1.0
    if memoryless:
        p = descend(p, shrink, lr, g_over_a, M, lr, correction)
    else:
        p = descend(p, shrink, lr / bias_correction1, exp_avg / denom, M, lr, correction)
    return Step(p, (exp_avg, exp_avg_sq), g_raw, M, diag)


def smooth_sign(x: Tensor, smoothing: float) -> Tensor:
    """phi_eps(x) = x / sqrt(x^2 + eps); eps = 0 is sign(x)."""
    return torch.sign(x) if smoothing == 0.0 else x / torch.sqrt(x * x + smoothing)


def smooth_sign_slope(x: Tensor, smoothing: float) -> Tensor:
    """phi'_eps(x) = eps / (x^2 + eps)^(3/2); zero for sign, away from x = 0."""
    if smoothing == 0.0:
        return torch.zeros_like(x)
    s = x * x + smoothing
    return smoothing / (s * torch.sqrt(s))


def lion(p: Tensor, g: Tensor, exp_avg: Tensor, g_ref: Tensor | None, *,
         lr: float, beta1: float, beta2: float, weight_decay: float, smoothing: float,
         ema_weight: float, age_weight: float, correction: float, hvp_scale: float,
         memoryless: bool) -> Step:
    """Lion (sign) or Lion-K with a smooth sign, and the correction of THEORY.md section 4."""
    c = beta1 * exp_avg + (1 - beta1) * g
    wg = ema_weight * g  # W_n g: c_n with every past gradient replaced by the current one
    decay = weight_decay * p
    phi_c = smooth_sign(c, smoothing)
    phi_wg = smooth_sign(wg, smoothing)
    F = phi_c + decay
    u = phi_wg + decay
    if g_ref is None:
        M = torch.zeros_like(p)
    else:
        hvp = (g_ref - g) * hvp_scale
        M = smooth_sign_slope(wg, smoothing) * age_weight * hvp
    exp_avg = beta2 * exp_avg + (1 - beta2) * g
    penalty = torch.sqrt(wg * wg + smoothing)
    sign_flips = (torch.sign(c) != torch.sign(g)).to(p.dtype)
    diag = diagnostics(F, u, M, lr, penalty, sign_flips)
    p = descend(p, 1 - lr * weight_decay, lr, phi_wg if memoryless else phi_c, M, lr, correction)
    return Step(p, (exp_avg,), g, M, diag)


def sgd(p: Tensor, g: Tensor, momentum_buffer: Tensor | None, g_ref: Tensor | None, *,
        lr: float, momentum: float, weight_decay: float, nesterov: bool,
        update_scale: float, memory_coef: float, correction: float, hvp_scale: float,
        memoryless: bool) -> Step:
    """Heavy-ball or Nesterov SGD (coupled decay, dampening 0) and the correction of section 2."""
    g_raw = g
    g = g + weight_decay * p  # g~
    states: tuple[Tensor, ...] = ()
    if momentum_buffer is None:
        F = g
    else:
        momentum_buffer = momentum * momentum_buffer + g
        F = g + momentum * momentum_buffer if nesterov else momentum_buffer
        states = (momentum_buffer,)
    u = update_scale * g
    if g_ref is None:
        M = torch.zeros_like(p)
    else:
        hvp = (g_ref - g_raw) * hvp_scale + weight_decay * g  # H~ g~ = H g~ + lambda g~
        M = memory_coef * hvp
    diag = diagnostics(F, u, M, lr, 0.5 * g * g, torch.zeros_like(p))
    p = descend(p, 1.0, lr, u if memoryless else F, M, lr, correction)
    return Step(p, states, g_raw, M, diag)


# Memoryless directions d = F(theta, ..., theta), evaluated by the optimizers before a
# probe or exact HVP (the fused steps above compute the same u inline).

def adamw_direction(p: Tensor, g: Tensor, *, eps: float, weight_decay: float, decoupled: bool,
                    eps_inside_sqrt: bool) -> Tensor:
    """g / a + decay, in place on a where the values are the same: each full-size temporary is a fresh
    allocation, and its first-touch page faults cost more than the arithmetic."""
    if not decoupled:
        g = g + weight_decay * p
    a = (g * g).add_(eps).sqrt_() if eps_inside_sqrt else torch.abs(g).add_(eps)
    u = torch.div(g, a, out=a)
    return u.add_(weight_decay * p) if decoupled else u


def lion_direction(p: Tensor, g: Tensor, *, weight_decay: float, smoothing: float, ema_weight: float) -> Tensor:
    return smooth_sign(ema_weight * g, smoothing).add_(weight_decay * p)  # in place: see adamw_direction


def sgd_direction(p: Tensor, g: Tensor, *, weight_decay: float) -> Tensor:
    """H~ is applied to g~ itself (M = c_n H~ g~), so d = g~ without the factor S_n."""
    return g + weight_decay * p
