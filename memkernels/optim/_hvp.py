"""Estimates of H d for the memory correction (docs/THEORY.md section 5): probe, exact and trajectory.

The probe is fused into the op (reference.probe): per bucket, one pass writes
theta + tau d into the parameters and keeps theta in an origin buffer, the
closure evaluates the gradient there, and the step reads theta back from the
origins, so no pass restores the parameters. tau = sqrt(eps) (1 + ||theta||)
/ ||d|| comes from the norms that the previous probe pass of the same parameters
reduced (the first pass of a bucket gets them from torch ops), in float64
tensor ops on the parameters' device. eps is the params' precision (float32's,
float64's) or, for half-precision params, the geometric mean of float32's and
theirs: theta + tau d is stored in bfloat16, whose rounding swamps a
displacement sized for float32 (H d 96% off on a quadratic), while one sized
for bfloat16 (sqrt of 2**-7) is so large that its truncation error biases H d on
a transformer (+2.9% held-out loss with the correction). The mean is a choice
made on the convergence suite's two tasks (bench/README.md), not a derivation.
The probe path reads nothing on the host, so it runs in device mode
(capturable=True, torch.compile) too.
tau only sets the finite-difference scale and the step divides by the same tau,
so a norm one step old costs nothing in accuracy.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..reference import compute_dtype, inv_scale, load_grad

Direction = Callable[[dict[str, Any], Tensor, Tensor], Tensor]
_FP32_EPS = torch.finfo(torch.float32).eps


def directions(direction: Direction, scalars: dict[str, Any], params: Sequence[Tensor],
               grads: Sequence[Tensor]) -> list[Tensor]:
    """d = F(theta, ..., theta) per param in torch ops (the exact HVP and a bucket's first probe)."""
    factor = inv_scale(scalars["grad_scale"])
    out = []
    for p, g in zip(params, grads):
        dtype = compute_dtype(p)
        out.append(direction(scalars, p.to(dtype), load_grad(g.detach().to(dtype), factor, scalars["maximize"])))
    return out


def _probe_eps(dtype: torch.dtype) -> float:
    """The precision tau is sized for: the dtype's, or for a half-precision dtype its geometric mean with
    float32's (the module's docstring)."""
    eps = torch.finfo(dtype).eps
    return eps if eps <= _FP32_EPS else (_FP32_EPS * eps) ** 0.5


def _squares(tensors: Sequence[Tensor]) -> Tensor:
    """sum of squares of a list of tensors, as a float64 tensor (no host read)."""
    return torch.stack([n.double() for n in torch._foreach_norm(list(tensors))]).square().sum()


class Probes:
    """One optimizer's probe buffers: theta's origin per parameter, the last norms per bucket."""

    def __init__(self) -> None:
        self.origins: dict[int, Tensor] = {}  # id(param) -> buffer (the param_groups hold the params)
        self.norms: dict[tuple, tuple[tuple[int, ...], Tensor]] = {}  # bucket key -> (its params, norms)

    def tau(self, key: tuple, params: Sequence[Tensor], first_norms: Callable[[], Tensor]) -> Tensor:
        """This pass's tau from the last norms of these params, and a zeroed norms tensor for this pass."""
        ids = tuple(id(p) for p in params)
        last = self.norms.get(key)
        norms = last[1] if last is not None and last[0] == ids else first_norms()
        eps = max(map(_probe_eps, (p.dtype for p in params)))
        theta, d = norms.sqrt().unbind()
        return torch.where(d > 0, eps ** 0.5 * (1.0 + theta) / d, 0.0).reshape(1)

    def buffers(self, params: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for p in params:
            origin = self.origins.get(id(p))
            if origin is None or origin.shape != p.shape or origin.dtype != p.dtype or origin.stride() != p.stride():
                origin = self.origins[id(p)] = torch.empty_like(p, memory_format=torch.preserve_format)
            out.append(origin)
        return out

    def keep(self, key: tuple, params: Sequence[Tensor], norms: Tensor) -> None:
        self.norms[key] = (tuple(id(p) for p in params), norms)


def first_norms(direction: Direction, scalars: dict[str, Any], params: Sequence[Tensor],
                grads: Sequence[Tensor]) -> Tensor:
    """(sum theta^2, sum d^2) in torch ops, for a bucket that has no probe pass behind it."""
    d = directions(direction, scalars, params, grads)
    return torch.stack([_squares(params), _squares(d)])


def exact(direction: Direction, scalars: dict[str, Any], params: list[Tensor],
          grads: list[Tensor]) -> list[Tensor]:
    """g + H d by double backward (the grads carry a graph: loss.backward(create_graph=True))."""
    d = [x.to(p.dtype) for x, p in zip(directions(direction, scalars, params, grads), params)]
    with torch.enable_grad():
        hd = torch.autograd.grad(grads, params, grad_outputs=d, allow_unused=True)
    return [g.detach() + (torch.zeros_like(g) if h is None else h) for g, h in zip(grads, hd)]


def probe_gradients(params: list[Tensor], closure: Callable[[], Any]) -> list[Tensor]:
    """The closure's gradients at the probe point; each param's own gradient is put back after."""
    first = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with torch.enable_grad():
            closure()
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]
    finally:
        for p, g in zip(params, first):
            p.grad = g
