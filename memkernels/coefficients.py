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
from typing import Protocol

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


class Track(Protocol):
    """A coefficient recursion: advanced one step at a time, or jumped by a power of its transition matrix over
    its sums (and their constant 1). steady_from, if a track has it, is the first step from which the matrix
    is constant (a warm-up schedule before it)."""

    n: int

    def advance(self) -> None: ...

    def sums(self) -> list[float]: ...

    def transition(self) -> list[list[float]]: ...

    def set_sums(self, sums: list[float]) -> None: ...


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

def geometric(x: float, n: Tensor) -> Tensor:
    """sum_{k<n} x^k = (1 - x^n) / (1 - x), for 0 <= x < 1 (1 - x^n through expm1: no cancellation)."""
    if x == 0.0:
        return (n > 0).to(n.dtype)
    return -torch.expm1(n * math.log(x)) / (1.0 - x)


def ema_age_at(beta: float, n: Tensor) -> tuple[Tensor, Tensor]:
    """EMAAge(beta) at step n: (bias_correction Z_n, mean_age A_n); Y_n = beta (1-beta^n)/(1-beta) - n beta^(n+1)."""
    z = 1.0 - torch.pow(beta, n + 1)
    y = beta * geometric(beta, n) - n * torch.pow(beta, n + 1)
    return z, y / z


def heavy_ball_at(momentum: float, nesterov: bool, n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """HeavyBall at step n: (update_scale, c_n, S_{n-1} for heavy ball or S_n for Nesterov: the trajectory ratio).

    c_n sums mu^(n-j) S_j^2 (heavy ball) or mu^(n+1-j) S_j S_(j+1) (Nesterov) over j < n.
    """
    mu = momentum
    s = geometric(mu, n + 1)
    mu_n = torch.pow(mu, n)
    if nesterov:
        c = (mu * mu * geometric(mu, n) - n * (1.0 + mu) * mu_n * mu * mu + mu_n * mu ** 4 * geometric(mu, n))
        return 1.0 + mu * s, c / (1.0 - mu) ** 2, s
    c = mu * geometric(mu, n) - 2.0 * n * mu_n * mu + mu_n * mu ** 2 * geometric(mu, n)
    return s, c / (1.0 - mu) ** 2, geometric(mu, n)


def lion_weights_at(beta1: float, beta2: float, n: Tensor) -> tuple[Tensor, Tensor]:
    """LionWeights at step n: (W_n, C_n); C_n = beta1 (1-beta2) sum_{k=1..n} k beta2^(k-1) = beta1 (G_n - n beta2^n)."""
    b2n = torch.pow(beta2, n)
    return 1.0 - beta1 * b2n, beta1 * (geometric(beta2, n) - n * b2n)
