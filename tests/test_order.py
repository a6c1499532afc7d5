"""Order of accuracy of the memoryless approximation, docs/THEORY.md section 7, on theory.logistic() in float64.

For each optimizer with memory, over h in HS and horizon T:
- the memoryless path without M is a first-order approximation (slope ~ 1);
- with M (memoryless=True, memory_correction=1) it is second order (slope -> 2);
- the memory optimizer with memory_correction=-1 tracks the uncorrected
  memoryless path to second order;
with the exact, probe and trajectory HVPs alike. Slopes are log2(e_h / e_{h/2}).
The corrected paths run with the default correction_limit: where u_i crosses zero
the limit acts on a few elements, and the last test shows that the errors are
those of the unlimited correction (docs/THEORY.md section 9).
The two paths that do not depend on the HVP mode (the memory optimizer and the
plain memoryless one) are computed once per optimizer and shared. The
reference backend runs them: this file checks the math (the backends are
checked against reference elsewhere) and its runtime needs no JIT compilation.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import pytest
import torch

import memkernels as mk
from memkernels.theory import logistic, trajectory

HS = (0.02, 0.01, 0.005, 0.0025)
HORIZON = 0.6
HVPS = ("exact", "probe", "trajectory")

ADAM = dict(betas=(0.8, 0.9), eps=0.1, weight_decay=0.1)
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "heavy_ball": lambda ps, **kw: mk.SGD(ps, momentum=0.8, **kw),
    "nesterov": lambda ps, **kw: mk.SGD(ps, momentum=0.8, nesterov=True, **kw),
    "adamw": lambda ps, **kw: mk.AdamW(ps, **ADAM, **kw),
    "adamw_eps_inside": lambda ps, **kw: mk.AdamW(ps, **ADAM, eps_inside_sqrt=True, **kw),
    "adam_l2": lambda ps, **kw: mk.AdamW(ps, **ADAM, decoupled_weight_decay=False, **kw),
    "lion_smooth": lambda ps, **kw: mk.Lion(ps, betas=(0.8, 0.9), weight_decay=0.1, smoothing=0.0025, **kw),
}

# Measured slopes at the smallest pair of h. Memoryless without M: heavy ball 1.00, Nesterov 0.995,
# AdamW 0.88, eps inside 0.96, Adam + L2 0.87, Lion 1.11. Exact / probe / trajectory, corrected memoryless path:
# heavy ball 1.96/1.96/2.00, Nesterov 1.96/1.96/1.99, AdamW 1.86/1.86/1.88, eps inside 1.86/1.86/1.83,
# Adam + L2 1.73/1.73/1.79 (1.90 at the next halving, 0.00125: still pre-asymptotic here), Lion 2.10/2.10/2.40;
# cancelled memory path heavy ball 1.98/1.98/1.95, Nesterov 1.97/1.97/1.95, AdamW 1.86/1.86/1.86,
# eps inside 1.83/1.83/1.83, Adam + L2 1.76/1.76/1.76, Lion 2.38/2.38/2.03.
SECOND_ORDER = {"adam_l2": 1.7}  # the default bound is 1.8
# Lion's smooth sign has slope up to 1/sqrt(0.0025) = 20, so h = 0.02 is not yet small: there
# the corrected paths are no closer than the uncorrected one (measured 0.154 vs 0.108 with the
# trajectory HVP). The comparison starts at h = 0.01 for Lion, at the largest h for the others.
FIRST_CLOSER = {"lion_smooth": 1}


def factory(name: str, **kw) -> Callable[[list[torch.Tensor], float], torch.optim.Optimizer]:
    return lambda params, h: OPTIMIZERS[name](params, lr=h, backend="reference", **kw)


@functools.lru_cache(maxsize=None)
def path(name: str, h: float, kind: str, hvp: str | None, limit: float | None = None) -> torch.Tensor:
    """The iterates of one run: kind is "memory", "memoryless" (hvp None), "memoryless+M" or "memory-M";
    limit: a correction_limit other than the default."""
    kw = {"memory": {}, "memoryless": dict(memoryless=True),
          "memoryless+M": dict(memoryless=True, memory_correction=1.0, hvp=hvp),
          "memory-M": dict(memory_correction=-1.0, hvp=hvp)}[kind]
    if limit is not None:
        kw["correction_limit"] = limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the trajectory-HVP advice
        return trajectory(factory(name, **kw), logistic(), h, HORIZON, create_graph=hvp == "exact")


def errors(name: str, approx: str, target: str, hvp: str | None = None, limit: float | None = None) -> list[float]:
    """Max over the trajectory of |theta_approx - theta_target|, at each h."""
    return [float((path(name, h, approx, hvp, limit) - path(name, h, target, None)).norm(dim=1).max()) for h in HS]


def slopes(err: list[float]) -> list[float]:
    return [math.log(err[i] / err[i + 1]) / math.log(HS[i] / HS[i + 1]) for i in range(len(err) - 1)]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_memoryless_without_correction_is_first_order(name):
    s = slopes(errors(name, "memoryless", "memory"))
    assert 0.8 <= s[-1] <= 1.2, s


@pytest.mark.parametrize("hvp", HVPS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_memoryless_with_correction_is_second_order(name, hvp):
    corrected, plain = errors(name, "memoryless+M", "memory", hvp), errors(name, "memoryless", "memory")
    assert slopes(corrected)[-1] >= SECOND_ORDER.get(name, 1.8), (slopes(corrected), corrected)
    start = FIRST_CLOSER.get(name, 0)
    assert all(c < p for c, p in zip(corrected[start:], plain[start:])), (corrected, plain)


@pytest.mark.parametrize("hvp", HVPS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_cancelled_memory_tracks_memoryless_path(name, hvp):
    """memory_correction=-1 on the memory optimizer removes memory's effect to O(h^2)."""
    cancelled, plain = errors(name, "memory-M", "memoryless", hvp), errors(name, "memory", "memoryless")
    assert slopes(cancelled)[-1] >= SECOND_ORDER.get(name, 1.8), (slopes(cancelled), cancelled)
    start = FIRST_CLOSER.get(name, 0)
    assert all(c < p for c, p in zip(cancelled[start:], plain[start:])), (cancelled, plain)


@pytest.mark.parametrize("kind, target", [("memoryless+M", "memory"), ("memory-M", "memoryless")])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_default_limit_leaves_the_order(name, kind, target):
    """Where the expansion holds the limit acts only near zero crossings of the step, in O(1) steps of each
    crossing, each moving theta by O(h^2): at the two smallest h both corrected paths are within 10% of the
    unlimited ones' errors (measured: at most 8% above, Lion; equal to four digits for Adam + L2)."""
    limited, unlimited = errors(name, kind, target, "exact"), errors(name, kind, target, "exact", math.inf)
    for a, b in zip(limited[-2:], unlimited[-2:]):
        assert a <= 1.1 * b, (limited, unlimited)
