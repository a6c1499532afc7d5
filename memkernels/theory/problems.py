"""Small smooth float64 problems for the order-of-accuracy checks of docs/THEORY.md section 7."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class Problem:
    name: str
    loss: Callable[[Tensor], Tensor]
    theta0: Tensor


def logistic(d: int = 8, samples: int = 32, seed: int = 0) -> Problem:
    """Softplus logistic loss + quadratic + small quartic: smooth, d = 8 (docs/THEORY.md section 7).

    Curvature (Hessian eigenvalues about 0.3-0.6 at theta0) and gradients (norm
    about 0.7) are small enough that h in [0.0025, 0.02] is in the asymptotic
    regime where the corrected slopes reach 1.8-2.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, d, generator=gen, dtype=torch.float64)
    y = torch.sign(torch.randn(samples, generator=gen, dtype=torch.float64))
    center = 0.5 * torch.randn(d, generator=gen, dtype=torch.float64)
    theta0 = 0.5 * torch.randn(d, generator=gen, dtype=torch.float64)

    def loss(theta: Tensor) -> Tensor:
        margin = y * (x @ theta)
        return (torch.nn.functional.softplus(-margin).mean() + 0.1 * ((theta - center) ** 2).sum()
                + 0.01 * (theta ** 4).sum())

    return Problem("logistic", loss, theta0)


def tanh_regression(hidden: int = 4, inputs: int = 3, samples: int = 24, seed: int = 1) -> Problem:
    """A one-hidden-layer tanh network fitted by least squares: smooth and non-convex, 21 parameters."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, inputs, generator=gen, dtype=torch.float64)
    target = torch.sin(x.sum(dim=1))
    n1 = hidden * inputs
    theta0 = 0.5 * torch.randn(n1 + 2 * hidden + 1, generator=gen, dtype=torch.float64)

    def loss(theta: Tensor) -> Tensor:
        w1 = theta[:n1].reshape(hidden, inputs)
        b1, w2, b2 = theta[n1:n1 + hidden], theta[n1 + hidden:n1 + 2 * hidden], theta[-1]
        pred = torch.tanh(x @ w1.T + b1) @ w2 + b2
        return 0.5 * ((pred - target) ** 2).mean() + 0.05 * (theta ** 2).sum()

    return Problem("tanh_regression", loss, theta0)
