"""reference.py's per-element math in Triton, line by line with the same names, for one tile of elements.

The kernel (kernels.py) loads a tile and calls the op's functions here, chosen at compile time; an
op's parts, in OPS:

- step: <op> of memkernels/ops/<op>.py. It takes the tile's p and g, the op's states present in the
  call as a tuple (SGD without momentum has none), hvp (None where the step needs no M), `s` (the op's static
  scalars with those derive() computes from them alone), `n` (this step's scalars with those
  derived from them) and FLAGS (the op's constexpr flags), and returns p, the new states, the
  gradient kept as the next reference, and the diagnostic terms.
- direction: the op module's <op>_direction, the memoryless direction d of the probe pass.
- derived: the per-step values of the op module's <op>_derived, computed on the device from the step_scalars
  tensor: the step scalars (parameters in memkernels.ops's step_scalars order, read in float64),
  the static scalars that the derivation combines with them in float64, FLAGS and MEMORYLESS. Each
  value is derived in float64 in the host's order and rounded once to fp32, as the launch rounds the
  float that the host derives, so both give the same bits.
- per_step: the namedtuple `n` that derived returns, and that the host builds from the floats.
- flags (where the op has them): the flags that its scalars select, beyond the spec's bool flags.

Math is fp32 with IEEE division and square root (tl.div_rn, tl.sqrt_rn) in the order of
reference.py. A scalar that selects a code path in reference.py selects it here at compile time
(a flag of FLAGS), except weight_decay == 0, a branch on the scalar.
"""
from __future__ import annotations

from collections import namedtuple
from typing import Any, Callable, NamedTuple

import triton
import triton.language as tl

from ...ops import SPECS
from . import _rounding


# ------------------------------------------------------------------ shared math

@triton.jit
def estimate_hvp(g_ref, g, hvp_scale):
    return (g_ref - g) * hvp_scale


@triton.jit
def descend(p, step, M, update, n, SHRINK: tl.constexpr, CORRECT: tl.constexpr):
    """reference.descend, with n's step_size, correction_lr2, kappa_lr and, where SHRINK (an op whose shrink
    can differ from 1), shrink."""
    if SHRINK:
        p = p * n.shrink
    p = p - n.step_size * step
    limited = tl.zeros(p.shape, tl.int1)
    if CORRECT:
        term = n.correction_lr2 * M
        bound = n.kappa_lr * tl.abs(update)
        limited = tl.abs(term) > bound
        term = tl.where(limited, tl.where(term < 0, -bound, bound), term)
        p = p - term
    return p, limited


@triton.jit
def correction_scalars(lr, correction, correction_limit):
    return correction * lr * lr, correction_limit * lr


@triton.jit
def diagnostics(F, u, M, lr, penalty, sign_flips, limited):
    """reference.diagnostics; an op without sign flips passes the constant 0."""
    hM = lr * M
    memory = F - u
    residual = memory - hM
    return F * F, hM * hM, memory * memory, residual * residual, penalty, sign_flips, limited.to(tl.float32)


@triton.jit
def probe(p, d, tau):
    return p + tau * d, p * p, d * d


@triton.jit
def kahan(p, p_new, c):
    """reference.kahan: q (exact in bfloat16) and the new compensation."""
    y = (p_new - p) + c
    q = _rounding.round_nearest_bf16(p + y).to(tl.float32)
    c = y - (q - p)
    return q, c


@triton.jit
def decay_term(weight_decay, p):
    """weight_decay * p, or 0 when weight_decay == 0 (0 * inf is NaN). A branch on the scalar rather than
    tl.where, so that the interpreter does not form 0 * inf (and warn) to discard it."""
    decay = tl.zeros_like(p)
    if weight_decay != 0:
        decay = weight_decay * p
    return decay


@triton.jit
def _rdiv(scalar, x):
    """scalar / x as torch evaluates it for a Python scalar: reciprocal(x) * scalar."""
    return tl.div_rn(1.0, x) * scalar


@triton.jit
def _log1p(x):
    """log(1 + x) without cancellation for small x (core Triton has no log1p)."""
    w = 1.0 + x
    exact = w == 1.0
    return tl.where(exact, x, tl.div_rn(tl.log(w) * x, tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def _sign(x):
    """torch.sign as the reference computes it on the CPU: -1, 0 or 1 (0 for NaN)."""
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


# ------------------------------------------------------------------ adamw

AdamWStep = namedtuple("AdamWStep", (*SPECS["adamw"].step_scalars, "bias_correction2_sqrt", "shrink", "step_size",
                                     "correction_lr2", "kappa_lr"))


@triton.jit
def adamw(p, g, states, hvp, s, n, FLAGS: tl.constexpr, MEMORYLESS: tl.constexpr, CORRECT: tl.constexpr):
    exp_avg, exp_avg_sq = states
    g_raw = g
    if not FLAGS.decoupled:
        g = g + decay_term(s.weight_decay, p)  # coupled L2: the EMAs see g~ = g + lambda theta
    exp_avg = exp_avg + s.one_minus_beta1 * (g - exp_avg)
    exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * g * g
    decay = 0.0
    if FLAGS.decoupled:
        decay = decay_term(s.weight_decay, p)
    # What a step does not use (F and u without a correction or diagnostics, ...) the compiler drops.
    if FLAGS.eps_inside_sqrt:
        denom = tl.sqrt_rn(tl.div_rn(exp_avg_sq, n.bias_correction2) + s.eps)
        a = tl.sqrt_rn(g * g + s.eps)
        g_over_a = tl.div_rn(g, a)
        coef = _rdiv(n.mean_age1, a) - tl.div_rn(n.mean_age2 * (g_over_a * g_over_a), a)
        penalty = a
    else:
        denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), n.bias_correction2_sqrt) + s.eps
        a = tl.abs(g) + s.eps
        g_over_a = tl.div_rn(g, a)
        coef = tl.div_rn(n.mean_age1 - n.mean_age2 * tl.abs(g_over_a), a)
        penalty = tl.abs(g) - s.eps * _log1p(tl.div_rn(tl.abs(g), s.eps))
    F = tl.div_rn(tl.div_rn(exp_avg, n.bias_correction1), denom) + decay
    u = g_over_a + decay
    if hvp is None:
        M = tl.zeros_like(p)
    else:
        if not FLAGS.decoupled:
            hvp = hvp + s.weight_decay * u  # H~ = H + lambda I
        M = coef * hvp
    if MEMORYLESS:
        p, limited = descend(p, g_over_a, M, u, n, FLAGS.decoupled, CORRECT)
    else:
        p, limited = descend(p, tl.div_rn(exp_avg, denom), M, F, n, FLAGS.decoupled, CORRECT)
    diag = diagnostics(F, u, M, n.lr, penalty, 0.0, limited)
    return p, (exp_avg, exp_avg_sq), g_raw, diag


@triton.jit
def adamw_derived(lr, bias_correction1, bias_correction2, mean_age1, mean_age2, hvp_scale, weight_decay, correction,
                  correction_limit, FLAGS: tl.constexpr, MEMORYLESS: tl.constexpr):
    # The host's bias_correction2 ** 0.5 (libm pow) is the correctly rounded root but in the rarest cases;
    # fp64 sqrt is correctly rounded, and both are rounded once more to fp32 here.
    bias_correction2_sqrt = tl.sqrt(bias_correction2)
    shrink = 1 - lr * weight_decay  # read only where FLAGS.decoupled, as the host's
    if MEMORYLESS:
        step_size = lr
    else:
        step_size = lr / bias_correction1
    correction_lr2, kappa_lr = correction_scalars(lr, correction, correction_limit)
    return AdamWStep(lr=lr.to(tl.float32), bias_correction1=bias_correction1.to(tl.float32),
                     bias_correction2=bias_correction2.to(tl.float32), mean_age1=mean_age1.to(tl.float32),
                     mean_age2=mean_age2.to(tl.float32), hvp_scale=hvp_scale.to(tl.float32),
                     bias_correction2_sqrt=bias_correction2_sqrt.to(tl.float32), shrink=shrink.to(tl.float32),
                     step_size=step_size.to(tl.float32), correction_lr2=correction_lr2.to(tl.float32),
                     kappa_lr=kappa_lr.to(tl.float32))


@triton.jit
def adamw_direction(p, g, s, n, FLAGS: tl.constexpr):
    """The step's u, by the same operations."""
    if not FLAGS.decoupled:
        g = g + decay_term(s.weight_decay, p)
    if FLAGS.eps_inside_sqrt:
        a = tl.sqrt_rn(g * g + s.eps)
    else:
        a = tl.abs(g) + s.eps
    u = tl.div_rn(g, a)
    if FLAGS.decoupled:
        u = u + decay_term(s.weight_decay, p)
    return u


# ------------------------------------------------------------------ lion

LionStep = namedtuple("LionStep", (*SPECS["lion"].step_scalars, "shrink", "step_size", "correction_lr2", "kappa_lr"))


@triton.jit
def smooth_sign(x, smoothing, SIGN: tl.constexpr):
    """phi_eps(x) = x / sqrt(x^2 + eps); SIGN (eps = 0) is sign(x)."""
    if SIGN:
        y = _sign(x)
    else:
        y = tl.div_rn(x, tl.sqrt_rn(x * x + smoothing))
    return y


@triton.jit
def smooth_sign_slope(x, smoothing, SIGN: tl.constexpr):
    """phi'_eps(x) = eps / (x^2 + eps)^(3/2); zero for sign."""
    if SIGN:
        y = tl.zeros_like(x)
    else:
        s = x * x + smoothing
        y = _rdiv(smoothing, s * tl.sqrt_rn(s))
    return y


@triton.jit
def lion(p, g, states, hvp, s, n, FLAGS: tl.constexpr, MEMORYLESS: tl.constexpr, CORRECT: tl.constexpr):
    (exp_avg,) = states
    c = s.beta1 * exp_avg + s.one_minus_beta1 * g
    wg = n.ema_weight * g  # W_n g: c_n with every past gradient replaced by the current one
    decay = decay_term(s.weight_decay, p)
    phi_c = smooth_sign(c, s.smoothing, FLAGS.sign)
    phi_wg = smooth_sign(wg, s.smoothing, FLAGS.sign)  # dropped by the compiler where unused, as u is
    F = phi_c + decay
    u = phi_wg + decay
    if hvp is None:
        M = tl.zeros_like(p)
    else:
        M = smooth_sign_slope(wg, s.smoothing, FLAGS.sign) * n.age_weight * hvp
    exp_avg = s.beta2 * exp_avg + s.one_minus_beta2 * g
    penalty = tl.sqrt_rn(wg * wg + s.smoothing)
    sign_flips = (_sign(c) != _sign(g)).to(tl.float32)
    if MEMORYLESS:
        p, limited = descend(p, phi_wg, M, u, n, True, CORRECT)
    else:
        p, limited = descend(p, phi_c, M, F, n, True, CORRECT)
    diag = diagnostics(F, u, M, n.lr, penalty, sign_flips, limited)
    return p, (exp_avg,), g, diag


@triton.jit
def lion_derived(lr, ema_weight, age_weight, hvp_scale, weight_decay, correction, correction_limit,
                 FLAGS: tl.constexpr, MEMORYLESS: tl.constexpr):
    shrink = 1 - lr * weight_decay
    correction_lr2, kappa_lr = correction_scalars(lr, correction, correction_limit)
    return LionStep(lr=lr.to(tl.float32), ema_weight=ema_weight.to(tl.float32), age_weight=age_weight.to(tl.float32),
                    hvp_scale=hvp_scale.to(tl.float32), shrink=shrink.to(tl.float32), step_size=lr.to(tl.float32),
                    correction_lr2=correction_lr2.to(tl.float32), kappa_lr=kappa_lr.to(tl.float32))


@triton.jit
def lion_direction(p, g, s, n, FLAGS: tl.constexpr):
    return smooth_sign(n.ema_weight * g, s.smoothing, FLAGS.sign) + decay_term(s.weight_decay, p)


def lion_flags(*, smoothing: float, **_: Any) -> dict[str, bool]:
    """reference.smooth_sign's branch: smoothing == 0 is the sign."""
    return dict(sign=smoothing == 0.0)


# ------------------------------------------------------------------ sgd

SGDStep = namedtuple("SGDStep", (*SPECS["sgd"].step_scalars, "step_size", "correction_lr2", "kappa_lr"))


@triton.jit
def sgd(p, g, states, hvp, s, n, FLAGS: tl.constexpr, MEMORYLESS: tl.constexpr, CORRECT: tl.constexpr):
    """Without momentum the buffer is absent: no state, and F = g~."""
    g_raw = g
    g = g + decay_term(s.weight_decay, p)  # g~
    if len(states) == 0:
        F = g
    else:
        (momentum_buffer,) = states
        momentum_buffer = s.momentum * momentum_buffer + g
        if FLAGS.nesterov:
            F = g + s.momentum * momentum_buffer
        else:
            F = momentum_buffer
        states = (momentum_buffer,)
    u = n.update_scale * g
    if hvp is None:
        M = tl.zeros_like(p)
    else:
        hvp = hvp + s.weight_decay * g  # H~ g~ = H g~ + lambda g~
        M = n.memory_coef * hvp
    if MEMORYLESS:
        p, limited = descend(p, u, M, u, n, False, CORRECT)
    else:
        p, limited = descend(p, F, M, F, n, False, CORRECT)
    diag = diagnostics(F, u, M, n.lr, 0.5 * g * g, 0.0, limited)
    return p, states, g_raw, diag


@triton.jit
def sgd_derived(lr, update_scale, memory_coef, hvp_scale, weight_decay, correction, correction_limit,
                FLAGS: tl.constexpr, MEMORYLESS: tl.constexpr):
    correction_lr2, kappa_lr = correction_scalars(lr, correction, correction_limit)
    return SGDStep(lr=lr.to(tl.float32), update_scale=update_scale.to(tl.float32),
                   memory_coef=memory_coef.to(tl.float32), hvp_scale=hvp_scale.to(tl.float32),
                   step_size=lr.to(tl.float32), correction_lr2=correction_lr2.to(tl.float32),
                   kappa_lr=kappa_lr.to(tl.float32))


@triton.jit
def sgd_direction(p, g, s, n, FLAGS: tl.constexpr):
    """H~ is applied to g~ itself (M = c_n H~ g~), so d = g~ without the factor S_n."""
    return g + decay_term(s.weight_decay, p)


# ------------------------------------------------------------------ ademamix

AdEMAMixStep = namedtuple("AdEMAMixStep", (*SPECS["ademamix"].step_scalars, "one_minus_beta3", "bias_correction2_sqrt",
                                           "shrink", "step_size", "update_scale", "age_sum", "scaled_age2",
                                           "correction_lr2", "kappa_lr"))


@triton.jit
def ademamix(p, g, states, hvp, s, n, FLAGS: tl.constexpr, MEMORYLESS: tl.constexpr, CORRECT: tl.constexpr):
    exp_avg, exp_avg_slow, exp_avg_sq = states
    exp_avg = exp_avg + s.one_minus_beta1 * (g - exp_avg)
    exp_avg_slow = exp_avg_slow + n.one_minus_beta3 * (g - exp_avg_slow)
    exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * g * g
    decay = decay_term(s.weight_decay, p)
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), n.bias_correction2_sqrt) + s.eps
    step = tl.div_rn(tl.div_rn(exp_avg, n.bias_correction1) + n.alpha * exp_avg_slow, denom)
    a = tl.abs(g) + s.eps
    g_over_a = tl.div_rn(g, a)
    memoryless_step = n.update_scale * g_over_a
    F = step + decay
    u = memoryless_step + decay
    if hvp is None:
        M = tl.zeros_like(p)
    else:
        M = tl.div_rn(n.age_sum - n.scaled_age2 * tl.abs(g_over_a), a) * hvp
    penalty = tl.abs(g) - s.eps * _log1p(tl.div_rn(tl.abs(g), s.eps))
    if MEMORYLESS:
        p, limited = descend(p, memoryless_step, M, u, n, True, CORRECT)
    else:
        p, limited = descend(p, step, M, F, n, True, CORRECT)
    diag = diagnostics(F, u, M, n.lr, penalty, 0.0, limited)
    return p, (exp_avg, exp_avg_slow, exp_avg_sq), g, diag


@triton.jit
def ademamix_derived(lr, beta3, alpha, bias_correction1, bias_correction2, slow_sum, mean_age1, mean_age2, slow_age,
                     hvp_scale, weight_decay, correction, correction_limit, FLAGS: tl.constexpr,
                     MEMORYLESS: tl.constexpr):
    update_scale = 1.0 + alpha * slow_sum
    correction_lr2, kappa_lr = correction_scalars(lr, correction, correction_limit)
    return AdEMAMixStep(lr=lr.to(tl.float32), beta3=beta3.to(tl.float32), alpha=alpha.to(tl.float32),
                        bias_correction1=bias_correction1.to(tl.float32),
                        bias_correction2=bias_correction2.to(tl.float32), slow_sum=slow_sum.to(tl.float32),
                        mean_age1=mean_age1.to(tl.float32), mean_age2=mean_age2.to(tl.float32),
                        slow_age=slow_age.to(tl.float32), hvp_scale=hvp_scale.to(tl.float32),
                        one_minus_beta3=(1 - beta3).to(tl.float32),
                        bias_correction2_sqrt=tl.sqrt(bias_correction2).to(tl.float32),
                        shrink=(1 - lr * weight_decay).to(tl.float32), step_size=lr.to(tl.float32),
                        update_scale=update_scale.to(tl.float32),
                        age_sum=(mean_age1 + alpha * slow_age).to(tl.float32),
                        scaled_age2=(update_scale * mean_age2).to(tl.float32),
                        correction_lr2=correction_lr2.to(tl.float32), kappa_lr=kappa_lr.to(tl.float32))


@triton.jit
def ademamix_direction(p, g, s, n, FLAGS: tl.constexpr):
    """The step's u, by the same operations."""
    return tl.div_rn(g, tl.abs(g) + s.eps) * n.update_scale + decay_term(s.weight_decay, p)


# ------------------------------------------------------------------ the ops

class Op(NamedTuple):
    """One op's parts (see above), by reference.py's names."""

    step: triton.JITFunction
    direction: triton.JITFunction
    derived: triton.JITFunction
    per_step: type
    flags: Callable[..., dict[str, bool]] | None = None


OPS = {"adamw": Op(adamw, adamw_direction, adamw_derived, AdamWStep),
       "lion": Op(lion, lion_direction, lion_derived, LionStep, lion_flags),
       "sgd": Op(sgd, sgd_direction, sgd_derived, SGDStep),
       "ademamix": Op(ademamix, ademamix_direction, ademamix_derived, AdEMAMixStep)}
