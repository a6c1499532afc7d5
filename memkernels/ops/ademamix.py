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

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..coefficients import geometric
from ..reference import Step, correction_scalars, decay_term, descend, diagnostics
from .spec import BETA, FRACTION, NONNEGATIVE, POSITIVE, OpSpec, Scalar, State


def ademamix(p: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_slow: Tensor, exp_avg_sq: Tensor, hvp: Tensor | None, *,
             lr: float, beta1: float, beta2: float, beta3: float, alpha: float, eps: float, weight_decay: float,
             bias_correction1: float, bias_correction2: float, slow_sum: float, mean_age1: float, mean_age2: float,
             slow_age: float, correction: float, correction_limit: float, memoryless: bool) -> Step:
    """F = (m1 / Z1 + alpha m2) / (sqrt(v / Z2) + eps) + lambda theta, u = c g / a + lambda theta with
    c = 1 + alpha S_n and a = |g| + eps, M = (A1 + alpha Y3 - c B |g| / a) / a * H u."""
    s = ademamix_derived(lr=lr, beta1=beta1, beta2=beta2, beta3=beta3, alpha=alpha, weight_decay=weight_decay,
                         bias_correction2=bias_correction2, slow_sum=slow_sum, mean_age1=mean_age1,
                         mean_age2=mean_age2, slow_age=slow_age, correction=correction,
                         correction_limit=correction_limit)
    exp_avg = exp_avg + s["one_minus_beta1"] * (g - exp_avg)
    exp_avg_slow = exp_avg_slow + s["one_minus_beta3"] * (g - exp_avg_slow)
    exp_avg_sq = beta2 * exp_avg_sq + s["one_minus_beta2"] * g * g
    decay = decay_term(weight_decay, p)
    denom = torch.sqrt(exp_avg_sq) / s["bias_correction2_sqrt"] + eps
    step = (exp_avg / bias_correction1 + alpha * exp_avg_slow) / denom
    a = torch.abs(g) + eps
    g_over_a = g / a
    memoryless_step = s["update_scale"] * g_over_a  # c_n: m1^ -> g, m2 -> S_n g, v^ -> g^2
    F = step + decay
    u = memoryless_step + decay
    if hvp is None:
        M = torch.zeros_like(p)
    else:
        # (A1 + alpha Y3) / a - c B |g| / a^2, without a^2 to overflow (as reference.adamw)
        M = (s["age_sum"] - s["scaled_age2"] * torch.abs(g_over_a)) / a * hvp
    # H u = c grad Psi_eps: psi_eps(g) = |g| - eps log(1 + |g| / eps) is AdamW's potential (section 10)
    penalty = torch.abs(g) - eps * torch.log1p(torch.abs(g) / eps)
    p, limited = descend(p, memoryless_step if memoryless else step, M, u if memoryless else F, s,
                         correction != 0.0)
    diag = diagnostics(F, u, M, lr, penalty, torch.zeros_like(p), limited)
    return Step(p, (exp_avg, exp_avg_slow, exp_avg_sq), g, M, diag)


def ademamix_derived(*, lr: float, beta1: float, beta2: float, beta3: float, alpha: float, weight_decay: float,
                     bias_correction2: float, slow_sum: float, mean_age1: float, mean_age2: float, slow_age: float,
                     correction: float, correction_limit: float, **_: object) -> dict[str, float]:
    """update_scale c_n = 1 + alpha S_n; M's numerator A1 + alpha Y3 - c_n B |g| / a as age_sum and
    scaled_age2 = c_n B (Python floats: float64, rounded once to the compute dtype)."""
    update_scale = 1.0 + alpha * slow_sum
    return dict(one_minus_beta1=1 - beta1, one_minus_beta2=1 - beta2, one_minus_beta3=1 - beta3,
                bias_correction2_sqrt=bias_correction2 ** 0.5, shrink=1 - lr * weight_decay, step_size=lr,
                update_scale=update_scale, age_sum=mean_age1 + alpha * slow_age,
                scaled_age2=update_scale * mean_age2, **correction_scalars(lr, correction, correction_limit))


def ademamix_direction(p: Tensor, g: Tensor, *, eps: float, weight_decay: float, alpha: float, slow_sum: float,
                       **_: object) -> Tensor:
    """u = c g / (|g| + eps) + lambda theta, c = 1 + alpha S_n; in place on a (see ops/adamw.py's adamw_direction)."""
    a = torch.abs(g).add_(eps)
    u = torch.div(g, a, out=a).mul_(1.0 + alpha * slow_sum)
    return u.add_(decay_term(weight_decay, p))


def penalty_prefactor(lr: float, alpha: float, slow_sum: float, mean_age1: float, mean_age2: float,
                      slow_age: float) -> float:
    """R = h (A1 + alpha Y3 - c B) Psi_eps(g) (leading order in eps / |g|, lambda = 0): positive at the paper's
    betas, i.e. unlike AdamW's, AdEMAMix's memory regularizes (docs/THEORY.md section 10)."""
    return lr * (mean_age1 + alpha * slow_age - (1.0 + alpha * slow_sum) * mean_age2)


# ---------------------------------------------------------------- coefficients (docs/THEORY.md section 10)

def ademamix_alpha(n: int, alpha: float, warmup: float | None) -> float:
    """The slow EMA's weight at step n: min(t alpha / T_alpha, alpha), t = n + 1 (the paper's scheduler, as
    pytorch-optimizer evaluates it); alpha itself without a warm-up."""
    return alpha if warmup is None else min((n + 1) * alpha / warmup, alpha)


def ademamix_beta3(n: int, beta1: float, beta3: float, warmup: float | None) -> float:
    """The slow EMA's beta at step n: 1 / log(beta) moves linearly from 1 / log(beta1) at t = 0 to
    1 / log(beta3) at t = T_beta3 (t = n + 1; the paper's scheduler with beta_start = beta1), capped at beta3."""
    if warmup is None:
        return beta3
    log_beta1, log_beta3 = math.log(beta1), math.log(beta3)
    t = n + 1
    return min(math.exp(log_beta1 * log_beta3 / ((1.0 - t / warmup) * log_beta3 + (t / warmup) * log_beta1)),
               beta3)


@dataclass
class AdEMAMixAges:
    """AdEMAMix's coefficients: bias corrections, the slow EMA's weight sum and the three EMAs' ages.

    The slow EMA is not bias corrected: its weights sum to S_n (1 - beta3^(n+1) with a constant beta3), and
    the memoryless update is c_n g / (|g| + eps) + lambda theta with c_n = 1 + alpha_n S_n. Each age weighs a
    gradient of age k by the distance the memoryless steps since then moved theta, in units of the current
    step: D_k / c_n, D_k = sum_{s=n-k}^{n-1} c_s (= k while c is constant). With X = sum_k w_k D_k over an
    EMA's weights w_k, X_{n+1} = beta (X_n + c_n Z_n) (Z_n: the EMA's weight sum; the slow EMA's beta is
    beta3_{n+1} and its Z_n is S_n); mean_age1 = X1 / (Z1 c_n), mean_age2 = X2 / (Z2 c_n), slow_age = X3 / c_n
    (unnormalised, like S_n).

    alpha_warmup, beta3_warmup: the paper's schedulers (ademamix_alpha, ademamix_beta3); None keeps alpha
    and beta3 constant. While a scheduler runs the recursion has no constant matrix: replay steps through
    the warm-up (steady_from) and jumps from there.
    """

    beta1: float
    beta2: float
    beta3: float
    alpha: float
    alpha_warmup: float | None = None
    beta3_warmup: float | None = None
    n: int = 0
    x1: float = 0.0
    x2: float = 0.0
    x3: float = 0.0
    slow_sum: float | None = None  # S_n; None: S_0 = 1 - beta3_0

    def __post_init__(self) -> None:
        for name in ("beta1", "beta2", "beta3"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"AdEMAMix: {name} must be in [0, 1), got {value}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0.0):
            raise ValueError(f"AdEMAMix: alpha must be finite and >= 0, got {self.alpha}")
        for name in ("alpha_warmup", "beta3_warmup"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"AdEMAMix: {name} must be None or finite and > 0, got {value}")
        if self.beta3_warmup is not None and (self.beta1 == 0.0 or self.beta3 == 0.0):
            raise ValueError("AdEMAMix: the beta3 warm-up interpolates 1 / log(beta1) and 1 / log(beta3), so both "
                             f"must be > 0, got beta1={self.beta1}, beta3={self.beta3}")
        if self.slow_sum is None:
            self.slow_sum = 1.0 - self.beta3_n

    @property
    def alpha_n(self) -> float:
        return ademamix_alpha(self.n, self.alpha, self.alpha_warmup)

    @property
    def beta3_n(self) -> float:
        return ademamix_beta3(self.n, self.beta1, self.beta3, self.beta3_warmup)

    @property
    def bias_correction1(self) -> float:
        return 1.0 - self.beta1 ** (self.n + 1)

    @property
    def bias_correction2(self) -> float:
        return 1.0 - self.beta2 ** (self.n + 1)

    @property
    def update_scale(self) -> float:
        """c_n = 1 + alpha_n S_n."""
        return 1.0 + self.alpha_n * self.slow_sum

    @property
    def mean_age1(self) -> float:
        return self.x1 / (self.bias_correction1 * self.update_scale)

    @property
    def mean_age2(self) -> float:
        return self.x2 / (self.bias_correction2 * self.update_scale)

    @property
    def slow_age(self) -> float:
        return self.x3 / self.update_scale

    @property
    def steady_from(self) -> int:
        """The first step from which alpha_n and beta3_n are constant, so that transition() holds: t = n + 1 > T,
        and one step more, as exp(log beta3) at t = T may differ from beta3 in the last bit."""
        return max((math.floor(w) + 1 for w in (self.alpha_warmup, self.beta3_warmup) if w is not None), default=0)

    def advance(self) -> None:
        c, s = self.update_scale, self.slow_sum
        self.x1 = self.beta1 * (self.x1 + c * self.bias_correction1)
        self.x2 = self.beta2 * (self.x2 + c * self.bias_correction2)
        b3 = ademamix_beta3(self.n + 1, self.beta1, self.beta3, self.beta3_warmup)
        self.x3 = b3 * (self.x3 + c * s)
        self.slow_sum = b3 * s + (1.0 - b3)
        self.n += 1

    def sums(self) -> list[float]:
        s, z1, z2 = self.slow_sum, self.bias_correction1, self.bias_correction2
        return [self.x1, self.x2, self.x3, z1, z2, s, s * z1, s * z2, s * s]

    def transition(self) -> list[list[float]]:
        """(X1, X2, X3, Z1, Z2, S, S Z1, S Z2, S^2, 1) one step on with constant alpha and beta3 (n >= steady_from):
        c_n = 1 + alpha S_n makes the X rows need the products."""
        b1, b2, b3, al = self.beta1, self.beta2, self.beta3, self.alpha
        q1, q2, q3 = 1.0 - b1, 1.0 - b2, 1.0 - b3
        return [[b1, 0.0, 0.0, b1, 0.0, 0.0, b1 * al, 0.0, 0.0, 0.0],
                [0.0, b2, 0.0, 0.0, b2, 0.0, 0.0, b2 * al, 0.0, 0.0],
                [0.0, 0.0, b3, 0.0, 0.0, b3, 0.0, 0.0, b3 * al, 0.0],
                [0.0, 0.0, 0.0, b1, 0.0, 0.0, 0.0, 0.0, 0.0, q1],
                [0.0, 0.0, 0.0, 0.0, b2, 0.0, 0.0, 0.0, 0.0, q2],
                [0.0, 0.0, 0.0, 0.0, 0.0, b3, 0.0, 0.0, 0.0, q3],
                [0.0, 0.0, 0.0, q3 * b1, 0.0, b3 * q1, b3 * b1, 0.0, 0.0, q3 * q1],
                [0.0, 0.0, 0.0, 0.0, q3 * b2, b3 * q2, 0.0, b3 * b2, 0.0, q3 * q2],
                [0.0, 0.0, 0.0, 0.0, 0.0, 2.0 * b3 * q3, 0.0, 0.0, b3 * b3, q3 * q3],
                [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]

    def set_sums(self, sums: list[float]) -> None:
        self.x1, self.x2, self.x3, _, _, self.slow_sum = sums[:6]


# ---------------------------------------------------------------- the same at a step count on the device

def _ema_age_sum(beta: float, n: Tensor) -> Tensor:
    """Y_n = sum_{k=1..n} k (1 - beta) beta^k (EMAAge's y)."""
    return beta * geometric(beta, n) - n * torch.pow(beta, n + 1)


def _divided_power(a: float, b: float, n: Tensor) -> Tensor:
    """sum_{i<n} a^i b^(n-1-i) = (a^n - b^n) / (a - b), n a^(n-1) where a = b; through expm1 (no cancellation)."""
    hi, lo = max(a, b), min(a, b)
    if hi == lo:
        return torch.where(n > 0, n * torch.pow(hi, torch.clamp(n - 1.0, min=0.0)), 0.0)
    if lo == 0.0:
        return torch.where(n > 0, torch.pow(hi, torch.clamp(n - 1.0, min=0.0)), 0.0)
    return torch.pow(hi, n) * -torch.expm1(n * math.log1p((lo - hi) / hi)) / (hi - lo)


def _slow_shift(beta: float, beta3: float, n: Tensor) -> Tensor:
    """R = sum_{k=1..n} (1 - beta) beta^k sum_{s=n-k}^{n-1} beta3^(s+1): per unit alpha, how far the weighted
    displacements fall short of (1 + alpha) k (c_s = 1 + alpha - alpha beta3^(s+1))."""
    return beta * beta3 * (_divided_power(beta3, beta, n) - torch.pow(beta, n) * geometric(beta3, n))


def ademamix_ages_at(beta1: float, beta2: float, beta3: float, alpha: float,
                     n: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """AdEMAMixAges at step n with constant alpha and beta3: (bias_correction1, bias_correction2, slow_sum,
    mean_age1, mean_age2, slow_age).

    With alpha and beta3 constant D_k = (1 + alpha) k - alpha sum_{s=n-k}^{n-1} beta3^(s+1), so each
    X = (1 + alpha) Y - alpha R (_ema_age_sum, _slow_shift). With the warm-up schedulers D_k and the slow
    weights are products over the schedule's path: there is no closed form, and the coefficients come from
    the host recursion.
    Agrees with the recursion to 1e-12 relative, 1e-11 at beta3 = 0.9999 for n <= 10 (eps / (n (1 - beta3))
    of cancellation, as ema_age_at's: tests/test_ademamix_math.py).
    """
    z1, z2 = 1.0 - torch.pow(beta1, n + 1), 1.0 - torch.pow(beta2, n + 1)
    s = (1.0 - beta3) * geometric(beta3, n + 1)
    c = 1.0 + alpha * s
    x1, x2, x3 = ((1.0 + alpha) * _ema_age_sum(b, n) - alpha * _slow_shift(b, beta3, n) for b in (beta1, beta2, beta3))
    return z1, z2, s, x1 / (z1 * c), x2 / (z2 * c), x3 / c


SPEC = OpSpec(
    "ademamix", (State("exp_avg"), State("exp_avg_slow"), State("exp_avg_sq", squares=True)),
    (Scalar("lr", NONNEGATIVE, per_step=True, example=1e-2), Scalar("beta1", BETA, example=0.9),
     Scalar("beta2", BETA, example=0.999), Scalar("beta3", BETA, per_step=True, example=0.9999),
     Scalar("alpha", NONNEGATIVE, per_step=True, example=5.0), Scalar("eps", POSITIVE, example=1e-8),
     Scalar("weight_decay", NONNEGATIVE, example=0.1),
     Scalar("bias_correction1", FRACTION, per_step=True, example=0.271),
     Scalar("bias_correction2", FRACTION, per_step=True, example=0.003),
     Scalar("slow_sum", FRACTION, per_step=True, example=0.05),
     Scalar("mean_age1", NONNEGATIVE, per_step=True, example=0.63),
     Scalar("mean_age2", NONNEGATIVE, per_step=True, example=1.2),
     Scalar("slow_age", NONNEGATIVE, per_step=True, example=3.0)),
    ademamix, ademamix_direction, ademamix_derived)
