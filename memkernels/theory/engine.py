"""The general engine of docs/THEORY.md section 1: any update rule with memory -> its memoryless approximation.

A rule is written as F(n, theta, grads): the update at step n from the current
parameters and the gradient history, newest first. Its memoryless update
replaces every past gradient by the current one; its correction

    M^(n)(theta) = d/dt F(n, theta, [g(theta + t delta_k)]_k) at t = 0,
    delta_k = sum_{s=n-k}^{n-1} F^(s)(theta, ..., theta),

is one forward-mode pass through the rule whose tangent for grads[k] is
H delta_k. H delta_k is a cumulative sum of H applied to the distinct
directions F^(s)(theta, ..., theta) (distinct up to scale: one direction for
AdamW and heavy ball, one per early step for Lion-K), so the engine needs one
Hessian-vector product per distinct direction and never a Jacobian.

Cost: the history is a (depth, *theta.shape) tensor, so each rule evaluation
is O(depth x params) elementwise work on top of the HVP. That suits new rules
on research-sized models and moderate betas; for long memories on large
models (AdamW's beta2 = 0.999 keeps ~2e4 gradients at tol = 1e-10) use the
closed forms of the fused optimizers.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from .order import Factory, OrderResult, order_of_accuracy
from .problems import Problem

DEFAULT_TOL = 1e-10
MAX_DEPTH = 1_000_000
# Directions F^(s) that differ from a multiple of the previous one by less than this (relative, at least
# 1000 ulps of the dtype: the rounding of a rule's sums over a long history) share one HVP.
_ULPS = 1000.0

Update = Callable[[int, Tensor, Tensor], Tensor]
HVP = Callable[[Tensor], Tensor]  # stacked directions (J, *shape) -> H applied to each, (J, *shape)


@dataclass(frozen=True)
class Rule:
    """An optimizer with memory, theta_{n+1} = theta_n - h F^(n)(theta_n, grads).

    update(n, theta, grads): grads[k] is the gradient at theta_{n-k} (plus
    l2 * theta_{n-k}), shape (L, *theta.shape), L = min(n + 1, depth(tol)).
    The past may enter only through these gradients: that is what lets the
    engine differentiate the history with Hessian-vector products. The result
    must have theta's shape. Under the memoryless approximation the rule is
    also differentiated with torch.func.jvp, so it must be written in
    differentiable torch operations (no .item(), no in-place ops on grads).

    decay: rho in [0, 1) bounding the memory: the weight of grads[k] is at most
    rho^(k-1), and any explicit dependence on n (bias corrections) fades like
    rho^n. The history is truncated where rho^(k-1) < tol, and the engine
    evaluates F^(s)(theta, ..., theta) once for all s >= depth - 1, where it
    no longer depends on s (to tol).

    l2: coupled weight decay: the history holds g + l2 theta, whose Jacobian
    is H + l2 I (torch.optim.SGD's weight_decay, Adam's L2).
    """

    name: str
    update: Update
    decay: float
    l2: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"rule {self.name!r}: decay must be in [0, 1), got {self.decay}")
        if not math.isfinite(self.l2):
            raise ValueError(f"rule {self.name!r}: l2 must be finite, got {self.l2}")

    def depth(self, tol: float = DEFAULT_TOL) -> int:
        """How many gradients the history keeps: the weight bound rho^(k-1) of the first dropped one is < tol."""
        if not 0.0 < tol < 1.0:
            raise ValueError(f"tol must be in (0, 1), got {tol}")
        if self.decay == 0.0:
            return 2
        depth = 1 + max(1, math.ceil(math.log(tol) / math.log(self.decay)))
        if depth > MAX_DEPTH:
            raise ValueError(f"rule {self.name!r}: decay {self.decay} keeps {depth} gradients at tol={tol}; "
                             f"raise tol (at most {MAX_DEPTH} gradients)")
        return depth

    def __call__(self, n: int, theta: Tensor, grads: Tensor) -> Tensor:
        """F^(n)(theta, grads), checked to be a tensor of theta's shape."""
        out = self.update(n, theta, grads)
        if not isinstance(out, Tensor):
            raise ValueError(f"rule {self.name!r} at step {n}: returned {type(out).__name__}, not a tensor")
        if out.shape != theta.shape:
            raise ValueError(f"rule {self.name!r} at step {n}: returned shape {tuple(out.shape)}, "
                             f"expected theta's shape {tuple(theta.shape)}")
        return out


class Memoryless(NamedTuple):
    """The memoryless update F^(n)(theta, ..., theta), its correction M^(n)(theta) and how many HVPs it took."""

    update: Tensor
    M: Tensor
    hvps: int


def _check_finite(rule: Rule, n: int, what: str, x: Tensor) -> None:
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"rule {rule.name!r} at step {n}: {what} is not finite "
                         f"({bad} of {x.numel()} entries are NaN or inf)")


def _express(f: Tensor, norm: float, basis: list[Tensor], tol: float) -> tuple[int, float] | None:
    """f as (index, scale) on the basis, appending f when it is not a multiple of the last basis vector."""
    if norm == 0.0:
        return None
    if basis:
        b = basis[-1]
        scale = float(torch.sum(f * b)) / float(torch.sum(b * b))
        if float(torch.linalg.vector_norm(f - scale * b)) <= tol * norm:
            return len(basis) - 1, scale
    basis.append(f)
    return len(basis) - 1, 1.0


def _displacements(rule: Rule, n: int, theta: Tensor, g: Tensor, depth: int,
                   tol: float) -> tuple[Tensor, list[Tensor]]:
    """delta_k (k < L) as float64 coefficients (L, J) on J distinct directions F^(s)(theta, ..., theta)."""
    length = min(n + 1, depth)
    basis: list[Tensor] = []
    terms: list[tuple[int, float] | None] = []
    steady: tuple[int, float] | None = None
    for s in range(n - 1, n - length, -1):  # term i = n - 1 - s enters delta_k for every k > i
        if s + 1 >= depth and s < n - 1:
            terms.append(steady)  # F^(s) no longer depends on s: the rule's contract on decay
            continue
        f = rule(s, theta, g.expand(min(s + 1, depth), *g.shape)).detach()
        norm = float(torch.linalg.vector_norm(f))
        if not math.isfinite(norm):
            _check_finite(rule, s, "the memoryless update", f)
        term = _express(f, norm, basis, tol)
        if s == n - 1:
            steady = term
        terms.append(term)
    rows = torch.zeros(length, len(basis), dtype=torch.float64)
    for i, term in enumerate(terms):
        if term is not None:
            rows[i + 1, term[0]] = term[1]
    return rows.cumsum(0), basis


def memoryless_terms(rule: Rule, n: int, theta: Tensor, grad: Tensor, hvp: HVP | None = None, *,
                     tol: float = DEFAULT_TOL) -> Memoryless:
    """F^(n)(theta, ..., theta) and M^(n)(theta) from the gradient g(theta) and an HVP (no HVP: M = 0).

    grad is the loss gradient only; the rule's l2 term is added here. The
    result carries no autograd graph.
    """
    if not (isinstance(n, int) and n >= 0):
        raise ValueError(f"the step index n must be an int >= 0, got {n!r}")
    if grad.shape != theta.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)}, theta {tuple(theta.shape)}")
    depth = rule.depth(tol)
    length = min(n + 1, depth)
    theta = theta.detach()
    g = grad.detach() + rule.l2 * theta if rule.l2 else grad.detach()
    history = g.expand(length, *g.shape)
    coef, basis = (_displacements(rule, n, theta, g, depth, max(tol, _ULPS * torch.finfo(g.dtype).eps))
                   if hvp is not None and length > 1 else (None, []))
    if not basis:
        update = rule(n, theta, history)
        _check_finite(rule, n, "the memoryless update", update)
        return Memoryless(update.detach(), torch.zeros_like(update), 0)
    directions = torch.stack(basis)
    hd = hvp(directions)
    if hd.shape != directions.shape:
        raise ValueError(f"hvp returned shape {tuple(hd.shape)} for directions of shape {tuple(directions.shape)}")
    if rule.l2:
        hd = hd + rule.l2 * directions
    tangents = (coef.to(dtype=hd.dtype, device=hd.device) @ hd.reshape(len(hd), -1)).reshape(history.shape)
    update, M = torch.func.jvp(lambda grads: rule(n, theta, grads), (history.clone(),), (tangents,))
    _check_finite(rule, n, "the memoryless update", update)
    _check_finite(rule, n, "the correction M (the rule's derivative is infinite or undefined there)", M)
    return Memoryless(update, M, len(basis))


def loss_hvp(loss: Callable[[Tensor], Tensor], theta: Tensor) -> tuple[Tensor, HVP]:
    """g(theta) and the exact HVP of a scalar loss(theta), both by torch.func (forward over reverse)."""
    theta = theta.detach()
    grad_fn = torch.func.grad(loss)

    def hvp(directions: Tensor) -> Tensor:
        return torch.func.vmap(lambda v: torch.func.jvp(grad_fn, (theta,), (v,))[1])(directions)

    return grad_fn(theta), hvp


def correction(rule: Rule, n: int, theta: Tensor, loss: Callable[[Tensor], Tensor], *,
               tol: float = DEFAULT_TOL) -> Tensor:
    """M^(n)(theta) of the rule on loss(theta): one HVP per distinct direction and one JVP through the rule."""
    grad, hvp = loss_hvp(loss, theta)
    return memoryless_terms(rule, n, theta, grad, hvp, tol=tol).M


# ---------------------------------------------------------------- optimizer-like stepping


class _Stepper:
    """Steps a list of parameters as one flat vector theta (the rule sees theta.flatten() of all of them)."""

    def __init__(self, params: Sequence[Tensor], lr: float, rule: Rule, tol: float) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("no parameters to step")
        if not (math.isfinite(lr) and lr > 0.0):
            raise ValueError(f"lr must be finite and > 0, got {lr}")
        self.lr, self.rule, self.tol, self.n = lr, rule, tol, 0
        self.depth = rule.depth(tol)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _theta(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def _grads(self) -> list[Tensor]:
        missing = [i for i, p in enumerate(self.params) if p.grad is None]
        if missing:
            raise ValueError(f"parameters {missing} have no gradient: step(closure) needs the closure to call backward()")
        return [p.grad for p in self.params]

    def _move(self, update: Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.sub_(self.lr * update[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        self.n += 1

    @staticmethod
    def _evaluate(closure: Callable[[], Tensor] | None) -> Tensor | None:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


class MemoryStep(_Stepper):
    """The rule with its memory: theta <- theta - lr F^(n)(theta, stored gradient history)."""

    def __init__(self, params: Sequence[Tensor], lr: float, rule: Rule, *, tol: float = DEFAULT_TOL) -> None:
        super().__init__(params, lr, rule, tol)
        self.history: deque[Tensor] = deque(maxlen=self.depth)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = self._evaluate(closure)
        theta = self._theta()
        g = torch.cat([x.detach().reshape(-1) for x in self._grads()])
        self.history.appendleft(g + self.rule.l2 * theta if self.rule.l2 else g)
        with torch.no_grad():
            update = self.rule(self.n, theta, torch.stack(tuple(self.history)))
        _check_finite(self.rule, self.n, "the update", update)
        self._move(update)
        return loss


class MemorylessStep(_Stepper):
    """The memoryless approximation: theta <- theta - lr [F^(n)(theta, ..., theta) + correction lr M^(n)(theta)].

    correction = 1 is the approximation of docs/THEORY.md section 1 (O(lr^2) close
    to the rule with memory), 0 the plain memoryless path (O(lr)). M needs the
    Hessian: the closure must call backward(create_graph=True).
    """

    def __init__(self, params: Sequence[Tensor], lr: float, rule: Rule, *, correction: float = 1.0,
                 tol: float = DEFAULT_TOL) -> None:
        super().__init__(params, lr, rule, tol)
        if not math.isfinite(correction):
            raise ValueError(f"correction must be finite, got {correction}")
        self.correction = correction

    def _hvp(self, grads: list[Tensor]) -> HVP:
        if any(g.grad_fn is None for g in grads):
            raise ValueError("the memory correction needs gradients with a graph: the closure must call "
                             "loss.backward(create_graph=True) (order_of_accuracy(..., create_graph=True))")
        sizes = [p.numel() for p in self.params]

        def hvp(directions: Tensor) -> Tensor:
            outputs = [d.reshape(len(directions), *p.shape)
                       for d, p in zip(directions.split(sizes, dim=1), self.params)]
            with torch.enable_grad():
                hd = torch.autograd.grad(grads, self.params, grad_outputs=outputs, retain_graph=True,
                                         is_grads_batched=True, allow_unused=True)
            return torch.cat([torch.zeros_like(d) if h is None else h.reshape(len(directions), -1)
                              for h, d in zip(hd, outputs)], dim=1)

        return hvp

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = self._evaluate(closure)
        grads = self._grads()
        hvp = self._hvp(grads) if self.correction != 0.0 else None
        g = torch.cat([x.detach().reshape(-1) for x in grads])
        terms = memoryless_terms(self.rule, self.n, self._theta(), g, hvp, tol=self.tol)
        update = terms.update + (self.correction * self.lr) * terms.M if hvp is not None else terms.update
        self._move(update)
        return loss


def with_memory(rule: Rule, *, tol: float = DEFAULT_TOL) -> Factory:
    """A factory (params, lr) -> MemoryStep for order_of_accuracy."""
    return lambda params, lr: MemoryStep(params, lr, rule, tol=tol)


def memoryless(rule: Rule, *, correction: float = 1.0, tol: float = DEFAULT_TOL) -> Factory:
    """A factory (params, lr) -> MemorylessStep for order_of_accuracy."""
    return lambda params, lr: MemorylessStep(params, lr, rule, correction=correction, tol=tol)


# ---------------------------------------------------------------- the order-of-accuracy experiment

WITHOUT_M, WITH_M = "without M", "with M"


@dataclass
class RuleOrder:
    """Errors of the memoryless approximations of one rule on one problem, and their slopes in log h."""

    rule: str
    problem: str
    result: OrderResult

    @property
    def hs(self) -> list[float]:
        return self.result.hs

    @property
    def errors(self) -> dict[str, list[float]]:
        return self.result.errors

    def slopes(self, name: str) -> list[float]:
        """Slope between consecutive step sizes: the last one is the asymptotic order."""
        return self.result.slopes(name)

    def fitted(self, name: str) -> float:
        """Least-squares slope of log error against log h over all step sizes."""
        x = [math.log(h) for h in self.hs]
        y = [math.log(e) for e in self.errors[name]]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)

    def table(self) -> list[dict[str, float]]:
        """One row per step size: h and the error of each approximation."""
        return [{"h": h, **{name: e[i] for name, e in self.errors.items()}} for i, h in enumerate(self.hs)]


def rule_order(rule: Rule, problem: Problem, hs: Sequence[float] = (0.02, 0.01, 0.005, 0.0025),
               horizon: float = 0.6, *, tol: float = DEFAULT_TOL) -> RuleOrder:
    """The rule with memory against its memoryless approximation without and with M (docs/THEORY.md section 7).

    Expected: slope about 1 without M and about 2 with M, for smooth rules
    whose memory decays fast compared with the horizon.
    """
    result = order_of_accuracy(with_memory(rule, tol=tol),
                               {WITHOUT_M: memoryless(rule, correction=0.0, tol=tol),
                                WITH_M: memoryless(rule, correction=1.0, tol=tol)},
                               problem, hs, horizon, create_graph=True)
    return RuleOrder(rule.name, problem.name, result)
