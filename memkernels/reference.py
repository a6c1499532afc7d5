"""The executable spec: per-element math of every fused step, in plain torch.

Each function takes one tensor's worth of values in the compute dtype (fp32, or
fp64 for fp64 params) and returns the new values; backends/reference.py loops
over tensors and writes them back. This module holds what every op shares; each
op's own step, memoryless direction and derived scalars are in memkernels/ops/
with its spec. Every kernel (numba, Triton, CUDA) mirrors these functions line
by line with the same names.

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


def kahan(p: Tensor, p_new: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """A bfloat16 param's compensated write, in float32: the param to store, q (bfloat16 to nearest even,
    so exact in the param), and the new compensation c, what q lost (stored in bfloat16, to nearest).

    p is the param loaded, p_new the step's float32 result (everything it computed, the correction
    included), c the compensation the last write kept. A plain bfloat16 write loses every update below half
    an ulp of p, so the param stalls; here y, the update plus what earlier writes lost, accumulates in c
    until p + y reaches a bfloat16 neighbour, and q + c follows the float32 trajectory without a float32
    copy of the params (compensated summation; docs/DESIGN.md, "Compact states").
    """
    y = (p_new - p) + c
    q = (p + y).to(torch.bfloat16).float()
    c = y - (q - p)
    return q, c


def decay_term(weight_decay: float, p: Tensor) -> Tensor | float:
    """weight_decay * p, or 0 when weight_decay == 0: 0 * inf is NaN, and torch.optim skips the term there."""
    return weight_decay * p if weight_decay != 0 else 0.0
