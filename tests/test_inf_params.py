"""+-inf parameters with weight_decay 0 stay +-inf, as in torch.optim: the decay term is left out, not 0 * inf."""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from lion_pytorch import Lion as LionPytorch

import memkernels as mk
from memkernels import backends
from memkernels.ops import SPECS

BACKENDS = ["reference", "numba", "triton"]

# (ours, torch's) for one list of params; memory_correction 0 (the default) makes ours the plain step.
CASES: dict[str, tuple[Callable, Callable]] = {
    "sgd": (lambda ps, b: mk.SGD(ps, lr=0.1, momentum=0.0, backend=b),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.0)),
    "sgd_momentum": (lambda ps, b: mk.SGD(ps, lr=0.1, momentum=0.9, backend=b),
                     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    "sgd_nesterov": (lambda ps, b: mk.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, backend=b),
                     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)),
    "adam_coupled": (lambda ps, b: mk.AdamW(ps, lr=1e-2, weight_decay=0.0, decoupled_weight_decay=False, backend=b),
                     lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.0)),
    "adamw": (lambda ps, b: mk.AdamW(ps, lr=1e-2, weight_decay=0.0, backend=b),
              lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0)),
    "adamw_decay": (lambda ps, b: mk.AdamW(ps, lr=1e-2, weight_decay=0.01, backend=b),
                    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01)),
    "lion": (lambda ps, b: mk.Lion(ps, lr=1e-2, weight_decay=0.0, backend=b),
             lambda ps: LionPytorch(ps, lr=1e-2, weight_decay=0.0)),
}


def _need(backend: str) -> None:
    status = backends.load(backend)
    if not status.startswith("available"):
        pytest.skip(f"{backend} backend {status}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_inf_params_match_torch(case, backend):
    _need(backend)
    ours, theirs = CASES[case]
    gen = torch.Generator().manual_seed(0)
    init = torch.cat([torch.tensor([math.inf, -math.inf]), torch.randn(7, generator=gen)])
    p, q = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt, ref = ours([p], backend), theirs([q])
    for _ in range(3):
        g = torch.randn(init.shape, generator=gen)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert p[0].item() == math.inf and p[1].item() == -math.inf, p
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [
    lambda ps, b: mk.AdamW(ps, lr=1e-2, weight_decay=0.0, track_memory=True, backend=b),
    lambda ps, b: mk.Lion(ps, lr=1e-2, weight_decay=0.0, track_memory=True, backend=b),
    lambda ps, b: mk.SGD(ps, lr=1e-2, track_memory=True, backend=b),
], ids=["adamw", "lion", "sgd"])
def test_inf_params_keep_diagnostics_finite(make, backend):
    """F and u (the diagnostics' update and memory terms) carry no 0 * inf either, with the probe pass on."""
    _need(backend)
    p = torch.nn.Parameter(torch.tensor([math.inf, -math.inf, 0.5, -0.3]))
    opt = make([p], backend)
    for _ in range(3):
        p.grad = torch.tensor([0.1, -0.2, 0.3, 0.4])
        opt.step()
    assert p[0].item() == math.inf and p[1].item() == -math.inf, p
    stats = opt.memory_stats()[0]
    assert math.isfinite(stats["update_norm"]) and math.isfinite(stats["memory_effect"]), stats


@pytest.mark.parametrize("op, kw", [
    ("adamw", dict(eps=1e-8, decoupled=True, eps_inside_sqrt=False)),
    ("adamw", dict(eps=1e-8, decoupled=False, eps_inside_sqrt=True)),
    ("lion", dict(smoothing=1e-4, ema_weight=0.5)),
    ("sgd", dict()),
])
def test_directions_keep_inf_params_finite(op, kw):
    """The memoryless direction the probe pass moves theta along adds nothing for an infinite theta either."""
    p = torch.tensor([math.inf, -math.inf, 0.5])
    d = SPECS[op].direction(p, torch.tensor([0.3, -0.2, 0.1]), weight_decay=0.0, **kw)
    assert torch.isfinite(d).all(), d
