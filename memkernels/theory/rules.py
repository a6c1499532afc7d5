"""Update rules written through the gradient history, for the engine (engine.Rule).

Each function returns a Rule F(n, theta, grads), grads[k] = g_{n-k} newest
first. The shipped optimizers use memkernels.optim's conventions, so the
engine's M equals the closed forms of docs/THEORY.md sections 2-4 (reference.py):
heavy ball and Nesterov are torch.optim.SGD (coupled decay, dampening 0),
AdamW is torch.optim.AdamW (bias correction, decoupled decay; eps outside the
square root, or inside as in the paper), Lion is lion-pytorch's with the
smooth sign of Lion-K as an option, AdEMAMix is pytorch-optimizer's with decoupled
decay (docs/THEORY.md section 10). RMSprop with momentum and AdaBelief have no
closed form in docs/THEORY.md: the engine is the only way to get their correction.

History sums are written as weights against the stacked history (one matmul
each), so a rule costs O(L x params) work per evaluation, O(L^2 x params)
where it needs the EMA at every past step (ema_path: RMSprop, AdaBelief).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import ops
from ..ops.ademamix import ademamix_alpha, ademamix_beta3
from .engine import Rule


def _contract(weights: Tensor, x: Tensor) -> Tensor:
    """weights (..., L) against the history axis of x (L, *shape), as one matmul."""
    w = weights.to(dtype=x.dtype, device=x.device)
    return (w @ x.reshape(len(x), -1)).reshape(*w.shape[:-1], *x.shape[1:])


def weighted(grads: Tensor, weights: Tensor) -> Tensor:
    """sum_k weights[k] grads[k] over the first len(grads) weights (the history may be truncated)."""
    return _contract(weights[:len(grads)], grads)


@functools.lru_cache(maxsize=1024)
def powers(beta: float, length: int) -> Tensor:
    """beta^k for k < length, in float64 (cached: rules ask for the same weights at every step)."""
    return beta ** torch.arange(length, dtype=torch.float64)


def ema(x: Tensor, beta: float) -> Tensor:
    """The zero-initialized EMA sum_k (1 - beta) beta^k x[k] of a history x, newest first."""
    return weighted(x, (1.0 - beta) * powers(beta, len(x)))


@functools.lru_cache(maxsize=1024)
def _path_weights(beta: float, length: int) -> Tensor:
    lag = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # column - row
    return torch.where(lag >= 0, (1.0 - beta) * beta ** lag.clamp(min=0).to(torch.float64), 0.0)


def ema_path(x: Tensor, beta: float) -> Tensor:
    """The EMA after each past step: row j is the EMA of x[j:], i.e. the state at step n - j (O(L^2))."""
    return _contract(_path_weights(beta, len(x)), x)


def safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with derivative 0 (not inf) at 0: where a second moment vanishes (g = 0) the update is
    m / (sqrt(v) + eps) with m = 0, whose true derivative is finite; the plain chain rule gives 0 * inf."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def heavy_ball(momentum: float, weight_decay: float = 0.0, *, nesterov: bool = False) -> Rule:
    """torch.optim.SGD with momentum, dampening 0, coupled decay: F = b_n or g~_n + mu b_n (Nesterov).

    b_n = sum_k mu^k g~_{n-k}; M = c_n H~ g~ (docs/THEORY.md section 2, coefficients.HeavyBall).
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")

    def update(n: int, theta: Tensor, grads: Tensor) -> Tensor:
        b = weighted(grads, powers(momentum, len(grads)))
        return grads[0] + momentum * b if nesterov else b

    name = f"{'nesterov' if nesterov else 'heavy_ball'}(mu={momentum}, wd={weight_decay})"
    return Rule(name, update, decay=momentum, l2=weight_decay)


def nesterov(momentum: float, weight_decay: float = 0.0) -> Rule:
    """Nesterov momentum as torch.optim.SGD(nesterov=True): F = g~_n + mu b_n."""
    return heavy_ball(momentum, weight_decay, nesterov=True)


def adamw(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, *,
          eps_inside_sqrt: bool = False, decoupled: bool = True) -> Rule:
    """AdamW with bias correction: F = m^ / (sqrt(v^) + eps) + lambda theta (torch.optim.AdamW).

    eps_inside_sqrt: m^ / sqrt(v^ + eps) (the paper's convention). decoupled=False:
    Adam with L2 (the history holds g + lambda theta). M is docs/THEORY.md section 3.
    """
    beta1, beta2 = betas

    def update(n: int, theta: Tensor, grads: Tensor) -> Tensor:
        m = ema(grads, beta1) / (1.0 - beta1 ** (n + 1))
        v = ema(grads * grads, beta2) / (1.0 - beta2 ** (n + 1))
        denom = torch.sqrt(v + eps) if eps_inside_sqrt else safe_sqrt(v) + eps
        step = m / denom
        return step + weight_decay * theta if decoupled and weight_decay else step

    name = f"adamw(betas={betas}, eps={eps}, wd={weight_decay}, inside={eps_inside_sqrt}, decoupled={decoupled})"
    return Rule(name, update, decay=max(beta1, beta2), l2=0.0 if decoupled else weight_decay)


def lion(betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, *, smoothing: float = 0.0) -> Rule:
    """Lion (lion-pytorch): F = phi(c_n) + lambda theta, c_n = sum_k w_k g_{n-k}.

    w_0 = 1 - beta1, w_k = beta1 (1 - beta2) beta2^(k-1). phi = sign (M = 0:
    sign has zero derivative, also where c = 0) or, with smoothing > 0, the
    smooth sign x / sqrt(x^2 + smoothing) of Lion-K (docs/THEORY.md section 4).
    """
    beta1, beta2 = betas

    def update(n: int, theta: Tensor, grads: Tensor) -> Tensor:
        step = ops.lion.smooth_sign(weighted(grads, _lion_weights(beta1, beta2, len(grads))), smoothing)
        return step + weight_decay * theta if weight_decay else step

    name = f"lion(betas={betas}, wd={weight_decay}, smoothing={smoothing})"
    return Rule(name, update, decay=beta2)


@functools.lru_cache(maxsize=1024)
def _lion_weights(beta1: float, beta2: float, length: int) -> Tensor:
    """w_0 = 1 - beta1, w_k = beta1 (1 - beta2) beta2^(k-1)."""
    return torch.cat([torch.tensor([1.0 - beta1], dtype=torch.float64),
                      beta1 * (1.0 - beta2) * powers(beta2, length - 1)])


def smoothed_lion(betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                  smoothing: float = 1e-3) -> Rule:
    """Lion-K with the smooth sign x / sqrt(x^2 + smoothing)."""
    return lion(betas, weight_decay, smoothing=smoothing)


def rmsprop(alpha: float = 0.99, eps: float = 1e-8, momentum: float = 0.0, weight_decay: float = 0.0) -> Rule:
    """torch.optim.RMSprop (not centered): v_j = alpha v_{j-1} + (1 - alpha) g~_j^2,
    b_n = mu b_{n-1} + g~_n / (sqrt(v_n) + eps), F = b_n; coupled decay, no bias correction.

    No closed form for M in docs/THEORY.md: past gradients enter both the momentum
    and, through v at every past step, each term's own preconditioner.
    """

    def update(n: int, theta: Tensor, grads: Tensor) -> Tensor:
        v = ema_path(grads * grads, alpha)
        scaled = grads / (safe_sqrt(v) + eps)
        return weighted(scaled, powers(momentum, len(grads))) if momentum else scaled[0]

    name = f"rmsprop(alpha={alpha}, eps={eps}, mu={momentum}, wd={weight_decay})"
    return Rule(name, update, decay=max(alpha, momentum), l2=weight_decay)


def adabelief(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-16, weight_decay: float = 0.0, *,
              decoupled: bool = True) -> Rule:
    """AdaBelief (Zhuang et al. 2020, as adabelief-pytorch 0.2 with rectify=False):

    m_j = beta1 m_{j-1} + (1 - beta1) g_j,
    s_j = beta2 s_{j-1} + (1 - beta2) (g_j - m_j)^2 + eps,
    F = m_n / (1 - beta1^(n+1)) / (sqrt(s_n / (1 - beta2^(n+1))) + eps) + lambda theta.

    No closed form for M in docs/THEORY.md: the second moment is of the residual
    g - m, itself an EMA, so the memoryless s is eps-dominated and M mixes both EMAs.
    """
    beta1, beta2 = betas

    def update(n: int, theta: Tensor, grads: Tensor) -> Tensor:
        path = ema_path(grads, beta1)
        residual = grads - path
        s = weighted((1.0 - beta2) * residual * residual + eps, powers(beta2, len(grads)))
        m = path[0] / (1.0 - beta1 ** (n + 1))
        step = m / (safe_sqrt(s / (1.0 - beta2 ** (n + 1))) + eps)
        return step + weight_decay * theta if decoupled and weight_decay else step

    name = f"adabelief(betas={betas}, eps={eps}, wd={weight_decay}, decoupled={decoupled})"
    return Rule(name, update, decay=max(beta1, beta2), l2=0.0 if decoupled else weight_decay)


def ademamix(betas: tuple[float, float, float] = (0.9, 0.999, 0.9999), alpha: float = 5.0, eps: float = 1e-8,
             weight_decay: float = 0.0, *, alpha_warmup: float | None = None,
             beta3_warmup: float | None = None) -> Rule:
    """AdEMAMix: F = (m1 / (1 - beta1^(n+1)) + alpha_n m2) / (sqrt(v^) + eps) + lambda theta, m2 the slow EMA
    (beta3_n, not bias corrected); alpha_n and beta3_n from the paper's warm-up schedulers (None: constant).

    A warm-up makes F^(n)(theta, ..., theta) depend on n until it ends, not only through terms that fade
    like decay^n: evaluate at steps n < depth(tol), or with warm-ups shorter than the depth.
    """
    beta1, beta2, beta3 = betas

    def update(n: int, theta: Tensor, grads: Tensor) -> Tensor:
        m1 = ema(grads, beta1) / (1.0 - beta1 ** (n + 1))
        v = ema(grads * grads, beta2) / (1.0 - beta2 ** (n + 1))
        m2 = weighted(grads, _slow_weights(beta1, beta3, beta3_warmup, n, len(grads)))
        step = (m1 + ademamix_alpha(n, alpha, alpha_warmup) * m2) / (safe_sqrt(v) + eps)
        return step + weight_decay * theta if weight_decay else step

    name = (f"ademamix(betas={betas}, alpha={alpha}, eps={eps}, wd={weight_decay}, "
            f"warmups=({alpha_warmup}, {beta3_warmup}))")
    return Rule(name, update, decay=max(betas))


@functools.lru_cache(maxsize=1024)
def _slow_weights(beta1: float, beta3: float, warmup: float | None, n: int, length: int) -> Tensor:
    """The slow EMA's weight on g_{n-k}: (1 - beta3_{n-k}) prod_{j=n-k+1..n} beta3_j, with the scheduled betas."""
    if warmup is None:
        return (1.0 - beta3) * powers(beta3, length)
    weights, kept = [], 1.0
    for k in range(length):
        b = ademamix_beta3(n - k, beta1, beta3, warmup)
        weights.append((1.0 - b) * kept)
        kept *= b
    return torch.tensor(weights, dtype=torch.float64)
