"""The order-of-accuracy experiment: how fast a memoryless approximation converges to its target as h -> 0.

Both paths run full batch from the same start over a fixed horizon T with
T/h steps; the error is the largest distance between them along the way. An
approximation of order q has error O(h^q): slope log(e_h / e_h') / log(h / h').
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .problems import Problem

# make(params, h) -> an object with step(closure) and zero_grad(), e.g. a torch.optim optimizer
Factory = Callable[[list[Tensor], float], object]


def trajectory(make: Factory, problem: Problem, h: float, horizon: float, *, create_graph: bool = False) -> Tensor:
    """Iterates theta_0 .. theta_N, N = round(T / h), on the full-batch loss; one row per step."""
    theta = problem.theta0.clone().requires_grad_(True)
    opt = make([theta], h)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = problem.loss(theta)
        loss.backward(create_graph=create_graph)
        return loss

    path = [theta.detach().clone()]
    for _ in range(round(horizon / h)):
        opt.step(closure)
        path.append(theta.detach().clone())
    return torch.stack(path)


@dataclass
class OrderResult:
    hs: list[float]
    errors: dict[str, list[float]]  # per approximation, the max-over-trajectory error at each h

    def slopes(self, name: str) -> list[float]:
        e, h = self.errors[name], self.hs
        return [math.log(e[i] / e[i + 1]) / math.log(h[i] / h[i + 1]) for i in range(len(h) - 1)]


def order_of_accuracy(target: Factory, approximations: dict[str, Factory], problem: Problem,
                      hs: Sequence[float] = (0.02, 0.01, 0.005, 0.0025), horizon: float = 0.6, *,
                      create_graph: bool = False) -> OrderResult:
    errors: dict[str, list[float]] = {name: [] for name in approximations}
    for h in hs:
        reference = trajectory(target, problem, h, horizon, create_graph=create_graph)
        for name, make in approximations.items():
            path = trajectory(make, problem, h, horizon, create_graph=create_graph)
            errors[name].append(float((path - reference).norm(dim=1).max()))
    return OrderResult(list(hs), errors)
