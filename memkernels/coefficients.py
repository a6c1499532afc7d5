"""Scalar "EMA states" of THEORY.md: bias corrections and memory ages.

Every correction coefficient is a float64 recursion advanced once per step
(O(1)); the recursions are used instead of closed forms because the closed
forms cancel catastrophically for betas near 1 and small n.
"""
from __future__ import annotations

from dataclasses import dataclass


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


def replay(track, n: int):
    """Advance a fresh track to step n (used after load_state_dict or for a lagging parameter)."""
    while track.n < n:
        track.advance()
    return track
