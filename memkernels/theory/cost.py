"""What the engine costs on a model of realistic size, relative to one gradient evaluation (for the harness).

The engine's M takes the gradient, one HVP per distinct direction (one at
steady state: forward-over-reverse, a few gradients' worth) and one JVP
through the rule over its truncated history. The last is O(depth x params)
elementwise work independent of the batch, so the ratio depends on the
rule's memory depth and on the batch size: both are reported.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch
from torch import Tensor

from . import rules
from .engine import Rule, loss_hvp, memoryless_terms


def mlp_loss(params: int, batch: int, *, inputs: int = 128, classes: int = 10, device: str = "cpu",
             dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """A tanh MLP inputs -> w -> w -> classes with about `params` parameters, as loss(flat theta), and theta0."""
    # params ~ inputs w + w^2 + classes w + 2 w + classes: the positive root
    b = inputs + classes + 2
    width = max(1, round((-b + math.sqrt(b * b + 4 * max(params - classes, 1))) / 2))
    shapes = [(width, inputs), (width,), (width, width), (width,), (classes, width), (classes,)]
    sizes = [math.prod(s) for s in shapes]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, inputs, generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(classes, (batch,), generator=gen).to(device)
    theta0 = torch.cat([torch.randn(n, generator=gen) / math.sqrt(s[-1]) for n, s in zip(sizes, shapes)])

    def loss(theta: Tensor) -> Tensor:
        w1, b1, w2, b2, w3, b3 = (t.view(s) for t, s in zip(theta.split(sizes), shapes))
        hidden = torch.tanh(torch.tanh(x @ w1.T + b1) @ w2.T + b2)
        return torch.nn.functional.cross_entropy(hidden @ w3.T + b3, y)

    return loss, theta0.to(device=device, dtype=dtype)


def _median_seconds(fn: Callable[[], object], repeats: int, device: str) -> float:
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def engine_cost(params: int = 1_000_000, *, rule: Rule | None = None, batch: int = 256, tol: float = 1e-6,
                repeats: int = 5, device: str | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Median wall time of the engine's memoryless update and M at steady state, relative to one gradient.

    Default rule: AdamW with the moderate betas (0.8, 0.9) of docs/THEORY.md section 7
    (its history depth at tol sets the JVP's cost). ratio = engine / gradient,
    where the engine's time includes its own gradient; hvp_ratio and
    rule_ratio split the rest. Nothing is asserted: the harness reports it.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rule = rule or rules.adamw(betas=(0.8, 0.9), eps=1e-8, weight_decay=0.01)
    loss, theta = mlp_loss(params, batch, device=device, dtype=dtype)
    depth = rule.depth(tol)
    n = 2 * depth  # steady state: every F^(s) in the window is the same direction
    grad_fn = torch.func.grad(loss)

    def engine() -> object:
        grad, hvp = loss_hvp(loss, theta)
        return memoryless_terms(rule, n, theta, grad, hvp, tol=tol)

    g, hvp = loss_hvp(loss, theta)
    terms = engine()
    direction = terms.update.unsqueeze(0)
    grad_s = _median_seconds(lambda: grad_fn(theta), repeats, device)
    engine_s = _median_seconds(engine, repeats, device)
    hvp_s = _median_seconds(lambda: hvp(direction), repeats, device)
    rule_s = _median_seconds(lambda: memoryless_terms(rule, n, theta, g, lambda d: d, tol=tol), repeats, device)
    return {
        "params": theta.numel(), "batch": batch, "rule": rule.name, "depth": depth, "tol": tol, "step": n,
        "hvps": terms.hvps, "device": str(theta.device), "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "repeats": repeats,
        "gradient_s": grad_s, "engine_s": engine_s, "hvp_s": hvp_s, "rule_s": rule_s,
        "ratio": engine_s / grad_s, "hvp_ratio": hvp_s / grad_s, "rule_ratio": rule_s / grad_s,
    }
