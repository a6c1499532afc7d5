"""The record every op fills in once: its states, scalars and reference math (docs/DESIGN.md, "One spec per op").

The torch op schemas and argument checks (_ops.py), the optimizers' state keys, the step-scalar layout that
the device paths read, the reference backend's kernel and the host wrappers' derived scalars are all
generated from these records.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from .. import reference


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
    a device-mode step passes it in the step_scalars tensor. example: a typical value, and variants: values
    that take another code path (a flag's other value is implied), for the tests generated from the specs."""

    name: str
    bounds: Bounds | None = None  # None: a flag (bool)
    default: float | bool | None = None
    per_step: bool = False
    example: float | bool = False
    variants: tuple[float, ...] = ()

    def schema(self) -> str:
        kind = "bool" if self.bounds is None else "float"
        return f"{kind} {self.name}" + ("" if self.default is None else f"={self.default}")


@dataclass(frozen=True)
class State:
    """A param-shaped state: `key` in the optimizer's state (torch's state_dict name), `key + "s"` in the op.
    absent_when_zero names a scalar that, at 0, leaves the state out (SGD's buffer without momentum)."""

    key: str
    absent_when_zero: str | None = None
    squares: bool = False  # an EMA of squared gradients: never negative

    @property
    def list_name(self) -> str:
        return self.key + "s"


@dataclass(frozen=True)
class OpSpec:
    name: str
    states: tuple[State, ...]
    scalars: tuple[Scalar, ...]
    step: Callable[..., reference.Step]  # the element math, in plain torch
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

    @property
    def examples(self) -> dict[str, float | bool]:
        return {s.name: s.example for s in self.scalars}

    def scalar_schema(self) -> str:
        return ", ".join(s.schema() for s in self.scalars)


# Scalars every op takes (_ops._COMMON) that have bounds.
COMMON_BOUNDS = {"correction": FINITE, "correction_limit": Bounds(0.0, math.inf, low_open=True, high_open=False),
                 "hvp_scale": NONNEGATIVE, "probe_tau": NONNEGATIVE}
