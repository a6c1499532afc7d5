"""Each optimizer's step coefficients as one schedule with two forms of the same values.

host(group, gi, n): Python floats at step n from the float64 recursions of memkernels.coefficients, advanced one
step per step (O(log n) after a jump), for host mode. device(group, n): the same coefficients from their closed
forms, in tensor ops on a float64 step-count tensor, for device mode (no host read; equal to the recursions to
1e-10). Both hold the op's STEP_SCALARS coefficients and TRAJECTORY_RATIO, r in theta_{n-1} - theta_n ~
lr_{n-1} r d (docs/THEORY.md section 5), which scales the trajectory estimate of H d.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from torch import Tensor

from ..coefficients import (EMAAge, HeavyBall, LionWeights, Track, ema_age_at, heavy_ball_at, lion_weights_at,
                            replay)

TRAJECTORY_RATIO = "trajectory_ratio"


class Schedule:
    """One optimizer's coefficients; it keeps, per group, the recursions it advances."""

    def __init__(self) -> None:
        self._tracks: dict[tuple, dict[int, Track]] = {}

    def host(self, group: dict, gi: int, n: int) -> dict[str, float]:
        raise NotImplementedError

    def device(self, group: dict, n: Tensor) -> dict[str, Tensor | float]:
        raise NotImplementedError

    def track(self, gi: int, key: tuple, factory: Callable[[], Track], n: int) -> Track:
        """The recursion of group gi at step n: one step on from the last, O(log n) after a jump.

        Step n and the latest other count are kept, so a parameter one step behind its group costs no replay,
        and a count set back (a state reset) is not evicted by the ones ahead of it.
        """
        tracks = self._tracks.setdefault((gi, key), {})
        if n not in tracks:
            base = max((t for t in tracks.values() if t.n <= n), key=lambda t: t.n, default=None)
            tracks[n] = replay(dataclasses.replace(base) if base is not None else factory(), n)
            for old in sorted(t for t in tracks if t != n)[:-1]:
                del tracks[old]
        return tracks[n]


class AdamWSchedule(Schedule):
    """Both moments' bias corrections Z_n and mean ages A_n (docs/THEORY.md section 3)."""

    def host(self, group: dict, gi: int, n: int) -> dict[str, float]:
        beta1, beta2 = (float(b) for b in group["betas"])
        first = self.track(gi, ("exp_avg", beta1), lambda: EMAAge(beta1), n)
        second = self.track(gi, ("exp_avg_sq", beta2), lambda: EMAAge(beta2), n)
        return dict(bias_correction1=first.bias_correction, bias_correction2=second.bias_correction,
                    mean_age1=first.mean_age, mean_age2=second.mean_age, trajectory_ratio=1.0)

    def device(self, group: dict, n: Tensor) -> dict[str, Tensor | float]:
        (bias_correction1, mean_age1), (bias_correction2, mean_age2) = (
            ema_age_at(float(b), n) for b in group["betas"])
        return dict(bias_correction1=bias_correction1, bias_correction2=bias_correction2,
                    mean_age1=mean_age1, mean_age2=mean_age2, trajectory_ratio=1.0)


class LionSchedule(Schedule):
    """Lion's weight W_n on the new gradient and C_n, the weights' first moment (docs/THEORY.md section 4)."""

    def host(self, group: dict, gi: int, n: int) -> dict[str, float]:
        beta1, beta2 = (float(b) for b in group["betas"])
        weights = self.track(gi, ("lion", beta1, beta2), lambda: LionWeights(beta1, beta2), n)
        return dict(ema_weight=weights.w, age_weight=weights.c, trajectory_ratio=1.0)

    def device(self, group: dict, n: Tensor) -> dict[str, Tensor | float]:
        ema_weight, age_weight = lion_weights_at(*(float(b) for b in group["betas"]), n)
        return dict(ema_weight=ema_weight, age_weight=age_weight, trajectory_ratio=1.0)


class SGDSchedule(Schedule):
    """F / g = S_n (heavy ball) or S_{n+1} (Nesterov), c_n, and the trajectory ratio: the previous update was
    ~ S_{n-1} g~ (heavy ball) or S_n g~ (Nesterov) (docs/THEORY.md section 2)."""

    def host(self, group: dict, gi: int, n: int) -> dict[str, float]:
        momentum, nesterov = float(group["momentum"]), bool(group["nesterov"])
        hb = self.track(gi, ("sgd", momentum, nesterov), lambda: HeavyBall(momentum, nesterov), n)
        return dict(update_scale=hb.update_scale, memory_coef=hb.c, trajectory_ratio=hb.s if nesterov else hb.s_prev)

    def device(self, group: dict, n: Tensor) -> dict[str, Tensor | float]:
        update_scale, memory_coef, ratio = heavy_ball_at(float(group["momentum"]), bool(group["nesterov"]), n)
        return dict(update_scale=update_scale, memory_coef=memory_coef, trajectory_ratio=ratio)
