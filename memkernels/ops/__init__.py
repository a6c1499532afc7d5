"""The ops: one module per op holds its spec and its reference math (docs/DESIGN.md, "One spec per op").

Every module of this package that defines SPEC is an op; SPECS collects them (in name order), and every other
layer (the torch ops, the backends, the optimizers, the tests) is generated from SPECS.
"""
from __future__ import annotations

import importlib
import pkgutil

from .spec import COMMON_BOUNDS, Bounds, OpSpec


def _discover() -> dict[str, OpSpec]:
    modules = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "spec")
    specs = [getattr(importlib.import_module(f"{__name__}.{name}"), "SPEC", None) for name in modules]
    return {s.name: s for s in specs if s is not None}


def _bounds() -> dict[str, Bounds]:
    """Every scalar's bounds by name; ops that share a name share its bounds."""
    bounds = dict(COMMON_BOUNDS)
    for spec in SPECS.values():
        for s in spec.scalars:
            if s.bounds is not None and bounds.setdefault(s.name, s.bounds) != s.bounds:
                raise ValueError(f"{spec.name}'s {s.name} has other bounds than another op's {s.name}")
    return bounds


SPECS: dict[str, OpSpec] = _discover()
BOUNDS: dict[str, Bounds] = _bounds()
