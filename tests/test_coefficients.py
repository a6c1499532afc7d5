"""The scalar recursions of memkernels.coefficients against brute-force float64 sums (docs/THEORY.md sections 1-4).

Every expected value is a sum written straight from its definition and
evaluated with math.fsum (or, for nested partial sums, compensated running
sums), never from the recursion under test. Heavy ball and Nesterov take
c_n from the general formula of section 1 on the scalar quadratic L = theta^2/2
(H = 1, g = theta = 1), where M^(n) = c_n H g is exactly c_n.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import pytest
import torch

from memkernels.coefficients import (JUMP, EMAAge, HeavyBall, LionWeights, ema_age_at, heavy_ball_at,
                                    lion_weights_at, replay)

STEPS = (0, 1, 2, 3, 10, 100, 1000, 10000)
BETAS = (0.0, 0.5, 0.9, 0.99, 0.999, 0.9999)
REL = 1e-12


def close(actual: float, expected: float, rel: float = REL) -> bool:
    return math.isclose(actual, expected, rel_tol=rel, abs_tol=0.0)


def running_sums(terms: Sequence[float]) -> list[float]:
    """Partial sums t_0, t_0 + t_1, ... accurate to a few ulps (Neumaier's compensated summation)."""
    total, comp, out = 0.0, 0.0, []
    for t in terms:
        s = total + t
        comp += (total - s) + t if abs(total) >= abs(t) else (t - s) + total
        total = s
        out.append(total + comp)
    return out


def tracks_at(factory: Callable[[], object], steps: Sequence[int]) -> dict[int, object]:
    """One recursion advanced step by step through every requested step; a snapshot of its fields at each."""
    track, out = factory(), {}
    for n in sorted(steps):
        while track.n < n:
            track.advance()
        out[n] = type(track)(**vars(track))
    return out


# ---------------------------------------------------------------- AdamW's EMAs (section 3)

def ema_weights(beta: float, n: int) -> list[float]:
    """m_n = sum_k (1 - beta) beta^k g_{n-k}: the weight of the gradient of age k."""
    return [(1.0 - beta) * beta ** k for k in range(n + 1)]


@pytest.mark.parametrize("beta", BETAS)
def test_ema_bias_correction_and_mean_age(beta):
    for n, track in tracks_at(lambda: EMAAge(beta), STEPS).items():
        w = ema_weights(beta, n)
        z = math.fsum(w)  # Z_n: the total weight that bias correction divides out
        assert track.n == n
        assert close(track.bias_correction, z), (n, track.bias_correction, z)
        mean_age = math.fsum(k * wk for k, wk in enumerate(w)) / z
        assert close(track.mean_age, mean_age), (n, track.mean_age, mean_age)


@pytest.mark.parametrize("beta", BETAS[:4])
def test_ema_mean_age_limit(beta):
    """A_inf = beta / (1 - beta); betas whose memory has died out by n = 10^4."""
    track = replay(EMAAge(beta), 10000)
    assert close(track.mean_age, beta / (1.0 - beta))


def test_ema_mean_age_limit_slow_beta():
    """beta = 0.9999 needs 4 * 10^5 steps to converge; their rounding adds up to 9e-13 (measured)."""
    beta = 0.9999
    track = replay(EMAAge(beta), 400000)
    assert close(track.mean_age, beta / (1.0 - beta), rel=1e-11)


# ---------------------------------------------------------------- heavy ball and Nesterov (section 2)

def momentum_weights(mu: float, n: int, nesterov: bool) -> list[float]:
    """dF^(n)/dg_{n-k} from unrolling b_n = mu b_{n-1} + g_n (b_{-1} = 0).

    Heavy ball F = b_n = sum_k mu^k g_{n-k}; Nesterov F = g_n + mu b_n.
    """
    if not nesterov:
        return [mu ** k for k in range(n + 1)]
    return [1.0 + mu] + [mu ** (k + 1) for k in range(1, n + 1)]


def memoryless_updates(mu: float, n: int, nesterov: bool) -> list[float]:
    """F^(s)(theta, ..., theta) / g for s = 0..n: the sum of the weights of F^(s).

    The weight of age k does not depend on s, so these are the partial sums of one weight list.
    """
    return running_sums(momentum_weights(mu, n, nesterov))


def brute_force_c(mu: float, n: int, nesterov: bool) -> float:
    """docs/THEORY.md section 1 on L = theta^2/2 at theta = 1 (H = 1, g = 1): M = sum_k dF/dg_{n-k} delta_k."""
    w = momentum_weights(mu, n, nesterov)
    f = memoryless_updates(mu, n, nesterov)
    # delta_k = sum_{s=n-k}^{n-1} F^(s): suffix sums of f[:n], k = 1..n
    delta = running_sums([f[n - k] for k in range(1, n + 1)])
    return math.fsum(w[k] * delta[k - 1] for k in range(1, n + 1))


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
@pytest.mark.parametrize("mu", BETAS)
def test_momentum_coefficients(mu, nesterov):
    for n, track in tracks_at(lambda: HeavyBall(mu, nesterov), STEPS).items():
        f = memoryless_updates(mu, n, nesterov)
        s = math.fsum(mu ** j for j in range(n + 1))
        assert close(track.s, s), (n, track.s, s)
        if n:
            assert close(track.s_prev, math.fsum(mu ** j for j in range(n))), n
        assert close(track.update_scale, f[n]), (n, track.update_scale, f[n])
        c = brute_force_c(mu, n, nesterov)
        assert close(track.c, c), (n, track.c, c)


def test_brute_force_c_small_cases_by_hand():
    """The brute force itself.

    Heavy ball: c_1 = mu S_0 = mu, c_2 = mu S_1 + mu^2 (S_0 + S_1); Nesterov: c_1 = mu^2 S_1.
    """
    mu = 0.5
    assert brute_force_c(mu, 0, False) == 0.0
    assert brute_force_c(mu, 1, False) == mu
    assert math.isclose(brute_force_c(mu, 2, False), mu * 1.5 + mu * mu * 2.5)
    assert math.isclose(brute_force_c(mu, 1, True), mu * mu * 1.5)  # w_1 = mu^2, delta_1 = S_1


@pytest.mark.parametrize("mu", BETAS[:5])
def test_momentum_coefficient_limits(mu):
    """c_inf = mu / (1 - mu)^3 (heavy ball), mu^2 / (1 - mu)^3 (Nesterov), S_inf = 1 / (1 - mu)."""
    steps = 60000 if mu == 0.999 else 10000  # until mu^n n^2 is below 1e-12
    hb, nag = replay(HeavyBall(mu), steps), replay(HeavyBall(mu, nesterov=True), steps)
    assert close(hb.s, 1.0 / (1.0 - mu))
    assert close(hb.c, mu / (1.0 - mu) ** 3)
    assert close(nag.c, mu * mu / (1.0 - mu) ** 3)


# ---------------------------------------------------------------- Lion (section 4)

def lion_weights(beta1: float, beta2: float, n: int) -> list[float]:
    """c_n = sum_k w_k g_{n-k}: w_0 = 1 - beta1, w_k = beta1 (1 - beta2) beta2^(k-1)."""
    return [1.0 - beta1] + [beta1 * (1.0 - beta2) * beta2 ** (k - 1) for k in range(1, n + 1)]


@pytest.mark.parametrize("beta2", BETAS)
@pytest.mark.parametrize("beta1", BETAS)
def test_lion_weights(beta1, beta2):
    for n, track in tracks_at(lambda: LionWeights(beta1, beta2), STEPS).items():
        w = lion_weights(beta1, beta2, n)
        total = math.fsum(w)
        assert close(track.w, total), (n, track.w, total)
        age = math.fsum(k * wk for k, wk in enumerate(w))
        assert close(track.c, age), (n, track.c, age)


@pytest.mark.parametrize("beta2", BETAS[:4])
@pytest.mark.parametrize("beta1", BETAS)
def test_lion_weight_limits(beta1, beta2):
    """W_inf = 1 and C_inf = beta1 / (1 - beta2): betas2 whose memory has died out by n = 10^4."""
    track = replay(LionWeights(beta1, beta2), 10000)
    assert close(track.w, 1.0)
    assert close(track.c, beta1 / (1.0 - beta2))


def test_replay_is_idempotent():
    """replay advances a track to step n and leaves a track already there untouched."""
    track = replay(EMAAge(0.9), 5)
    same = replay(track, 5)
    assert same is track and track.n == 5
    assert close(track.mean_age, replay(EMAAge(0.9), 5).mean_age)


TRACKS = {"ema": EMAAge, "heavy_ball": HeavyBall, "nesterov": lambda b: HeavyBall(b, nesterov=True),
          "lion": lambda b: LionWeights(0.9, b)}


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("kind", TRACKS)
def test_a_jump_agrees_with_the_recursion(kind, beta):
    """replay jumps by a matrix power beyond JUMP steps: every field within 1e-12 of the step-by-step recursion
    (measured 1.5e-13), from step 0 and from a track part of the way there."""
    steps = [n for n in STEPS if n > JUMP]
    for n, stepped in tracks_at(lambda: TRACKS[kind](beta), steps).items():
        for start in (0, 7):
            jumped = replay(replay(TRACKS[kind](beta), start), n)
            assert jumped.n == n
            for field, value in vars(stepped).items():
                got = vars(jumped)[field]
                assert math.isclose(got, value, rel_tol=REL, abs_tol=1e-300), (n, start, field, got, value)


def test_a_resume_at_any_step_count_costs_no_replay(monkeypatch):
    """A track jumps to 10^7, 2^24 or 3e38 with no step-by-step advance, and lands on the limits."""
    advanced = []
    monkeypatch.setattr(EMAAge, "advance", lambda self: advanced.append(self.n))
    for n in (10**7, 2**24, int(3e38)):
        track = replay(EMAAge(0.999), n)
        assert track.n == n and advanced == []
        assert close(track.mean_age, 0.999 / (1.0 - 0.999), rel=1e-11)


# ---------------------------------------------------------------- closed forms (a step count held in a tensor)

CLOSED_STEPS = (0, 1, 2, 3, 10, 100, 1000, 3000)


def _at(n: int) -> torch.Tensor:
    return torch.tensor(float(n), dtype=torch.float64)


def _agree(actual: torch.Tensor, expected: float, rel: float) -> bool:
    return math.isclose(actual.item(), expected, rel_tol=rel, abs_tol=1e-300)


@pytest.mark.parametrize("beta", BETAS)
def test_ema_closed_form_matches_recursion(beta):
    """Bias correction bit-identical to the recursion's (both 1 - beta^(n+1)); mean age to 1e-11 (measured 1.3e-12)."""
    for n, track in tracks_at(lambda: EMAAge(beta), CLOSED_STEPS).items():
        z, age = ema_age_at(beta, _at(n))
        assert z.item() == track.bias_correction, n
        assert _agree(age, track.mean_age, 1e-11), (n, age.item(), track.mean_age)


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
@pytest.mark.parametrize("mu", BETAS[:5])
def test_momentum_closed_form_matches_recursion(mu, nesterov):
    """update scale, c_n and the trajectory ratio; 1e-9 (measured 5.6e-11 at mu = 0.999)."""
    for n, track in tracks_at(lambda: HeavyBall(mu, nesterov), CLOSED_STEPS).items():
        update_scale, c, ratio = heavy_ball_at(mu, nesterov, _at(n))
        assert _agree(update_scale, track.update_scale, 1e-12), n
        assert _agree(c, track.c, 1e-9) or track.c == c.item() == 0.0, (n, c.item(), track.c)
        expected_ratio = track.s if nesterov else track.s_prev
        assert _agree(ratio, expected_ratio, 1e-12) or expected_ratio == ratio.item() == 0.0, n


@pytest.mark.parametrize("beta2", BETAS)
@pytest.mark.parametrize("beta1", (0.0, 0.9, 0.99))
def test_lion_closed_form_matches_recursion(beta1, beta2):
    for n, track in tracks_at(lambda: LionWeights(beta1, beta2), CLOSED_STEPS).items():
        w, c = lion_weights_at(beta1, beta2, _at(n))
        assert _agree(w, track.w, 1e-12), n  # beta2^n by pow, the recursion by products
        assert _agree(c, track.c, 1e-10) or track.c == c.item() == 0.0, (n, c.item(), track.c)
