"""Heavy-ball and Nesterov SGD: spec and reference math (docs/THEORY.md section 2)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import Step, correction_scalars, decay_term, descend, diagnostics
from .spec import BETA, NONNEGATIVE, POSITIVE, OpSpec, Scalar, State


def sgd(p: Tensor, g: Tensor, momentum_buffer: Tensor | None, hvp: Tensor | None, *,
        lr: float, momentum: float, weight_decay: float, nesterov: bool,
        update_scale: float, memory_coef: float, correction: float, correction_limit: float,
        memoryless: bool) -> Step:
    """Heavy-ball or Nesterov SGD (coupled decay, dampening 0) and the correction of section 2."""
    g_raw = g
    g = g + decay_term(weight_decay, p)  # g~
    states: tuple[Tensor, ...] = ()
    if momentum_buffer is None:
        F = g
    else:
        momentum_buffer = momentum * momentum_buffer + g
        F = g + momentum * momentum_buffer if nesterov else momentum_buffer
        states = (momentum_buffer,)
    u = update_scale * g
    if hvp is None:
        M = torch.zeros_like(p)
    else:
        hvp = hvp + weight_decay * g  # H~ g~ = H g~ + lambda g~
        M = memory_coef * hvp
    s = sgd_derived(lr=lr, correction=correction, correction_limit=correction_limit)
    p, limited = descend(p, u if memoryless else F, M, u if memoryless else F, s, correction != 0.0)
    diag = diagnostics(F, u, M, lr, 0.5 * g * g, torch.zeros_like(p), limited)
    return Step(p, states, g_raw, M, diag)


def sgd_derived(*, lr: float, correction: float, correction_limit: float, **_: object) -> dict[str, float]:
    return dict(shrink=1.0, step_size=lr, **correction_scalars(lr, correction, correction_limit))


def sgd_direction(p: Tensor, g: Tensor, *, weight_decay: float, **_: object) -> Tensor:
    """H~ is applied to g~ itself (M = c_n H~ g~), so d = g~ without the factor S_n."""
    return g + decay_term(weight_decay, p)


SPEC = OpSpec(
    "sgd", (State("momentum_buffer", absent_when_zero="momentum"),),
    (Scalar("lr", NONNEGATIVE, per_step=True, example=1e-2), Scalar("momentum", BETA, example=0.9, variants=(0.0,)),
     Scalar("weight_decay", NONNEGATIVE, example=0.05), Scalar("nesterov"),
     Scalar("update_scale", POSITIVE, per_step=True, example=2.7),
     Scalar("memory_coef", NONNEGATIVE, per_step=True, example=3.1)),
    sgd, sgd_direction, sgd_derived)
