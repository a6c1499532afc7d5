"""Scalar "EMA states" of docs/THEORY.md: bias corrections and memory ages.

Every correction coefficient is a float64 recursion advanced once per step
(O(1)); the recursions are used instead of closed forms because the closed
forms cancel for betas near 1 and small n (1e-10 relative at 0.999, against the
recursions' 1e-13). Each recursion is linear in a few sums, so a jump of k steps
(a resume, a parameter that lags its group) is the k-th power of one matrix with
nonnegative entries: O(log k) products, no cancellation (`replay`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class EMAAge:
    """A bias-corrected EMA with weight beta: Z_n = 1 - beta^(n+1) and mean age A_n = Y_n / Z_n."""

    beta: float
    n: int = 0
    y: float = 0.0  # Y_n; Y_0 = 0, Y_{n+1} = beta (Y_n + Z_n)

    @property
    def bias_correction(self) -> float:
        return 1.0 - self.beta ** (self.n + 1)

    @property
    def mean_age(self) -> float:
        return self.y / self.bias_correction

    def advance(self) -> None:
        self.y = self.beta * (self.y + self.bias_correction)
        self.n += 1

    def sums(self) -> list[float]:
        return [self.y, self.bias_correction]

    def transition(self) -> list[list[float]]:
        """(y, z, 1) -> (beta (y + z), (1 - beta) + beta z, 1): advance() as a matrix."""
        b = self.beta
        return [[b, b, 0.0], [0.0, b, 1.0 - b], [0.0, 0.0, 1.0]]

    def set_sums(self, sums: list[float]) -> None:
        self.y = sums[0]


@dataclass
class HeavyBall:
    """S_n = sum_{j<=n} mu^j and the correction coefficient c_n (heavy ball) or its Nesterov counterpart.

    Heavy ball: F = S_n g, c_0 = 0, c_{n+1} = mu (c_n + S_n^2).
    Nesterov (update g + mu b_n): F = S_{n+1} g, c_0 = 0, c_{n+1} = mu c_n + mu^2 S_n S_{n+1}.
    """

    momentum: float
    nesterov: bool = False
    n: int = 0
    s: float = 1.0  # S_n
    s_prev: float = 0.0  # S_{n-1}
    c: float = 0.0  # c_n

    @property
    def update_scale(self) -> float:
        """F^(n)(theta, ..., theta) / g."""
        return 1.0 + self.momentum * self.s if self.nesterov else self.s

    def advance(self) -> None:
        mu, s_next = self.momentum, 1.0 + self.momentum * self.s
        if self.nesterov:
            self.c = mu * self.c + mu * mu * self.s * s_next
        else:
            self.c = mu * (self.c + self.s * self.s)
        self.s_prev, self.s = self.s, s_next
        self.n += 1

    def sums(self) -> list[float]:
        return [self.c, self.s * self.s, self.s, self.s_prev]

    def transition(self) -> list[list[float]]:
        """(c, S_n^2, S_n, S_{n-1}, 1) one step on; S_{n+1} = 1 + mu S_n."""
        mu = self.momentum
        c_row = [mu, mu ** 3, mu * mu, 0.0, 0.0] if self.nesterov else [mu, mu, 0.0, 0.0, 0.0]
        return [c_row, [0.0, mu * mu, 2.0 * mu, 0.0, 1.0], [0.0, 0.0, mu, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.0, 1.0]]

    def set_sums(self, sums: list[float]) -> None:
        self.c, _, self.s, self.s_prev = sums


@dataclass
class LionWeights:
    """Lion's weights on past gradients: W_n = 1 - beta1 beta2^n and C_n = sum_{k=1..n} k w_k."""

    beta1: float
    beta2: float
    n: int = 0
    beta2_pow: float = 1.0  # beta2^n
    c: float = 0.0  # C_n

    @property
    def w(self) -> float:
        return 1.0 - self.beta1 * self.beta2_pow

    def advance(self) -> None:
        self.c += (self.n + 1) * self.beta1 * (1.0 - self.beta2) * self.beta2_pow
        self.beta2_pow *= self.beta2
        self.n += 1

    def sums(self) -> list[float]:
        return [self.c, self.n * self.beta2_pow, self.beta2_pow]

    def transition(self) -> list[list[float]]:
        """(C_n, n beta2^n, beta2^n, 1) one step on."""
        k, b2 = self.beta1 * (1.0 - self.beta2), self.beta2
        return [[1.0, k, k, 0.0], [0.0, b2, b2, 0.0], [0.0, 0.0, b2, 0.0], [0.0, 0.0, 0.0, 1.0]]

    def set_sums(self, sums: list[float]) -> None:
        self.c, _, self.beta2_pow = sums


# ---------------------------------------------------------------- AdEMAMix (docs/THEORY.md section 10)

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


Track = EMAAge | HeavyBall | LionWeights | AdEMAMixAges
JUMP = 64  # steps beyond which replay jumps by matrix powers instead of advancing step by step


def _product(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[math.fsum(a[i][k] * b[k][j] for k in range(len(b))) for j in range(len(b[0]))] for i in range(len(a))]


def _power(m: list[list[float]], k: int) -> list[list[float]]:
    """m^k by repeated squaring."""
    out = [[float(i == j) for j in range(len(m))] for i in range(len(m))]
    while k:
        if k & 1:
            out = _product(out, m)
        k >>= 1
        if k:
            m = _product(m, m)
    return out


def replay(track: Track, n: int) -> Track:
    """Advance a track to step n: step by step over a few steps, by one matrix power over many (a resume at any
    step count costs O(log n)). A track with warm-up schedules (steady_from) steps through them first."""
    while track.n < min(n, getattr(track, "steady_from", 0)):
        track.advance()
    if n - track.n > JUMP:
        sums = [*track.sums(), 1.0]
        power = _power(track.transition(), n - track.n)
        track.set_sums([math.fsum(row[j] * sums[j] for j in range(len(sums))) for row in power[:-1]])
        track.n = n
    while track.n < n:
        track.advance()
    return track


# ---------------------------------------------------------------- closed forms for a step count on the device
#
# A compiled or CUDA-graph-captured step cannot read its step count on the host, so the coefficients are
# evaluated from the float64 count n with tensor ops. Each is the sum its recursion above accumulates,
# in closed form, 1 - beta^n through expm1. They agree with the recursions to 1e-12 relative for betas up
# to 0.9999 (momentum's second-order sums: 1e-10 at 0.999), far under float32 rounding
# (tests/test_coefficients.py).

def _geometric(x: float, n: Tensor) -> Tensor:
    """sum_{k<n} x^k = (1 - x^n) / (1 - x), for 0 <= x < 1 (1 - x^n through expm1: no cancellation)."""
    if x == 0.0:
        return (n > 0).to(n.dtype)
    return -torch.expm1(n * math.log(x)) / (1.0 - x)


def ema_age_at(beta: float, n: Tensor) -> tuple[Tensor, Tensor]:
    """EMAAge(beta) at step n: (bias_correction Z_n, mean_age A_n); Y_n = beta (1-beta^n)/(1-beta) - n beta^(n+1)."""
    z = 1.0 - torch.pow(beta, n + 1)
    y = beta * _geometric(beta, n) - n * torch.pow(beta, n + 1)
    return z, y / z


def heavy_ball_at(momentum: float, nesterov: bool, n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """HeavyBall at step n: (update_scale, c_n, S_{n-1} for heavy ball or S_n for Nesterov: the trajectory ratio).

    c_n sums mu^(n-j) S_j^2 (heavy ball) or mu^(n+1-j) S_j S_(j+1) (Nesterov) over j < n.
    """
    mu = momentum
    s = _geometric(mu, n + 1)
    mu_n = torch.pow(mu, n)
    if nesterov:
        c = (mu * mu * _geometric(mu, n) - n * (1.0 + mu) * mu_n * mu * mu + mu_n * mu ** 4 * _geometric(mu, n))
        return 1.0 + mu * s, c / (1.0 - mu) ** 2, s
    c = mu * _geometric(mu, n) - 2.0 * n * mu_n * mu + mu_n * mu ** 2 * _geometric(mu, n)
    return s, c / (1.0 - mu) ** 2, _geometric(mu, n)


def lion_weights_at(beta1: float, beta2: float, n: Tensor) -> tuple[Tensor, Tensor]:
    """LionWeights at step n: (W_n, C_n); C_n = beta1 (1-beta2) sum_{k=1..n} k beta2^(k-1) = beta1 (G_n - n beta2^n)."""
    b2n = torch.pow(beta2, n)
    return 1.0 - beta1 * b2n, beta1 * (_geometric(beta2, n) - n * b2n)


def _ema_age_sum(beta: float, n: Tensor) -> Tensor:
    """Y_n = sum_{k=1..n} k (1 - beta) beta^k (EMAAge's y)."""
    return beta * _geometric(beta, n) - n * torch.pow(beta, n + 1)


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
    return beta * beta3 * (_divided_power(beta3, beta, n) - torch.pow(beta, n) * _geometric(beta3, n))


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
    s = (1.0 - beta3) * _geometric(beta3, n + 1)
    c = 1.0 + alpha * s
    x1, x2, x3 = ((1.0 + alpha) * _ema_age_sum(b, n) - alpha * _slow_shift(b, beta3, n) for b in (beta1, beta2, beta3))
    return z1, z2, s, x1 / (z1 * c), x2 / (z2 * c), x3 / c
