"""One frozen spec per op: what every layer needs to know about an op, written once (docs/DESIGN.md, "One
spec per op").

The torch op schemas and argument checks (_ops.py), the optimizers' state keys, the step-scalar layout that
the device paths read, the reference backend's kernel and the host wrappers' derived scalars are all
generated from these records. An op is its reference math (reference.py: a step, a memoryless direction and
a `derive` of the scalars that its kernels take precomputed) plus one spec here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from . import reference


@dataclass(frozen=True)
class Bounds:
    """The values a scalar may take: low..high, each end open or closed (NaN never passes)."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = True

    def check(self, name: str, value: float) -> None:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        if not (above and below):
            lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
            raise ValueError(f"{name} must be in {lo}{self.low}, {self.high}{hi}, got {value}")


NONNEGATIVE = Bounds(0.0, math.inf)
POSITIVE = Bounds(0.0, math.inf, low_open=True)
BETA = Bounds(0.0, 1.0)  # an EMA's weight on the past: [0, 1)
FRACTION = Bounds(0.0, 1.0, low_open=True, high_open=False)  # 1 - beta^k for beta in [0, 1): (0, 1]
FINITE = Bounds(-math.inf, math.inf, low_open=True)


@dataclass(frozen=True)
class Scalar:
    """A scalar argument of the op. per_step: it moves from step to step (lr and the memory coefficients), so
    a device-mode step passes it in the step_scalars tensor."""

    name: str
    bounds: Bounds | None = None  # None: a flag (bool)
    default: float | bool | None = None
    per_step: bool = False

    def schema(self) -> str:
        kind = "bool" if self.bounds is None else "float"
        return f"{kind} {self.name}" + ("" if self.default is None else f"={self.default}")


@dataclass(frozen=True)
class State:
    """A param-shaped state: `key` in the optimizer's state (torch's state_dict name), `key + "s"` in the op.
    absent_when_zero names a scalar that, at 0, leaves the state out (SGD's buffer without momentum)."""

    key: str
    absent_when_zero: str | None = None

    @property
    def list_name(self) -> str:
        return self.key + "s"


@dataclass(frozen=True)
class OpSpec:
    name: str
    states: tuple[State, ...]
    scalars: tuple[Scalar, ...]
    step: Callable[..., reference.Step]  # reference.py's element math
    direction: Callable[..., Any]  # the memoryless direction d whose H d the correction needs
    derive: Callable[..., dict[str, float]]  # the scalars a kernel takes precomputed, from the op's scalars

    @property
    def state_keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self.states)

    @property
    def optional_state_keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self.states if s.absent_when_zero)

    @property
    def state_lists(self) -> tuple[str, ...]:
        return tuple(s.list_name for s in self.states)

    @property
    def step_scalars(self) -> tuple[str, ...]:
        """The order of the step_scalars tensor: the per-step scalars, then the HVP estimate's scale."""
        return (*(s.name for s in self.scalars if s.per_step), "hvp_scale")

    @property
    def static_scalars(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.scalars if not s.per_step)

    def scalar_schema(self) -> str:
        return ", ".join(s.schema() for s in self.scalars)


# Scalars every op takes (_ops._COMMON) that have bounds.
COMMON_BOUNDS = {"correction": FINITE, "correction_limit": Bounds(0.0, math.inf, low_open=True, high_open=False),
                 "hvp_scale": NONNEGATIVE, "probe_tau": NONNEGATIVE}

ADAMW = OpSpec(
    "adamw", (State("exp_avg"), State("exp_avg_sq")),
    (Scalar("lr", NONNEGATIVE, per_step=True), Scalar("beta1", BETA), Scalar("beta2", BETA),
     Scalar("eps", POSITIVE), Scalar("weight_decay", NONNEGATIVE),
     Scalar("bias_correction1", FRACTION, per_step=True), Scalar("bias_correction2", FRACTION, per_step=True),
     Scalar("mean_age1", NONNEGATIVE, per_step=True), Scalar("mean_age2", NONNEGATIVE, per_step=True),
     Scalar("decoupled", default=True), Scalar("eps_inside_sqrt", default=False)),
    reference.adamw, reference.adamw_direction, reference.adamw_derived)

LION = OpSpec(
    "lion", (State("exp_avg"),),
    (Scalar("lr", NONNEGATIVE, per_step=True), Scalar("beta1", BETA), Scalar("beta2", BETA),
     Scalar("weight_decay", NONNEGATIVE), Scalar("smoothing", NONNEGATIVE),
     Scalar("ema_weight", FRACTION, per_step=True), Scalar("age_weight", NONNEGATIVE, per_step=True)),
    reference.lion, reference.lion_direction, reference.lion_derived)

SGD = OpSpec(
    "sgd", (State("momentum_buffer", absent_when_zero="momentum"),),
    (Scalar("lr", NONNEGATIVE, per_step=True), Scalar("momentum", BETA), Scalar("weight_decay", NONNEGATIVE),
     Scalar("nesterov"), Scalar("update_scale", POSITIVE, per_step=True),
     Scalar("memory_coef", NONNEGATIVE, per_step=True)),
    reference.sgd, reference.sgd_direction, reference.sgd_derived)

SPECS: dict[str, OpSpec] = {s.name: s for s in (ADAMW, LION, SGD)}



def _bounds() -> dict[str, Bounds]:
    """Every scalar's bounds by name; ops that share a name share its bounds."""
    bounds = dict(COMMON_BOUNDS)
    for spec in SPECS.values():
        for s in spec.scalars:
            if s.bounds is not None and bounds.setdefault(s.name, s.bounds) != s.bounds:
                raise ValueError(f"{spec.name}'s {s.name} has other bounds than another op's {s.name}")
    return bounds


BOUNDS = _bounds()
