"""A small MLP trained on real minibatches of scikit-learn's digits, shared by the optimizer tests."""
from __future__ import annotations

from typing import Callable

import torch
from sklearn.datasets import load_digits

_X, _Y = load_digits(return_X_y=True)
X = torch.tensor(_X / 16.0, dtype=torch.float32)
Y = torch.tensor(_Y)


def mlp(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))


def batches(steps: int, batch: int = 64, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(X), (batch,), generator=gen)
        yield X[idx], Y[idx]


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, data) -> None:
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def run(make: Callable, steps: int = 300) -> torch.Tensor:
    model = mlp()
    train(model, make(model.parameters()), batches(steps))
    return flat(model)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
