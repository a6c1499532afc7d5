"""Per-element math of the fused steps for numba, mirroring memkernels/reference.py line by line.

Same names, same order of floating-point operations for the parameters and
states (but for the two AdamW divisions that adamw() names): every Python-float
scalar of reference.py arrives here already rounded to the compute dtype (as
torch rounds a Python scalar to the tensor's dtype), ``scalar / tensor`` is
written ``one / x * scalar`` (torch evaluates it as ``reciprocal(x) *
scalar``), and no fastmath flag is set on them, so NaN and Inf propagate and
nothing is contracted into an FMA (an FMA would change the states' last bits).
Results therefore equal the reference's to the last bit wherever no sqrt enters
(all states, SGD, sign-Lion); torch.sqrt on CPU comes from MKL and is not always
correctly rounded, where np.sqrt here is IEEE, so AdamW and smooth-Lion
parameters agree to about an ulp.

The flags (decoupled, eps_inside_sqrt, memoryless, ...) are compile-time
constants of each kernel (see kernels.py): after inlining, the branches on them
vanish. The scalars arrive as one of the named tuples below, all in the compute
dtype. Every op's step has one signature, (p, g, states, hvp, c, flags) ->
(p, states, g_raw, diag): its states a tuple in the order of the op's spec
(memkernels/ops/), its flags a tuple of the op's own, then correct and
has_hvp. ELEMENTS tells the one driver kernel what else differs between the
ops.

Diagnostics (the kernels sum them per sub-block in the compute dtype, see
kernels.py) leave the reference's order where that saves instructions,
since they are compared to 1e-6 and the diagnostics path is compute-bound:
F, u and lr M arrive scaled by DIAG_SCALE = 2**-4 through the diag_* scalars
(exact: a power of two), F and u as one multiply-add each, so that the
kernel's sums of their squares, one multiply-add per term, are scaled by
2**-8 like its other sums. The squares are formed from the scaled values: a
term past float32's range counts as its value where the reference's float32
square is Inf.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
from numba import njit

from ._dtypes import bf16_nearest
from ._log1p import log1p

# numpy error model: x / 0 is inf or NaN, not an exception. Not cached on their own: see kernels.py.
_jit = njit(error_model="numpy", forceinline=True)


class AdamWScalars(NamedTuple):
    zero: float
    one: float
    inv_scale: float  # 1/grad_scale (1 without AMP), negated when maximize
    ref_inv_scale: float  # inv_scale when grad_refs arrive raw (probe, exact), 1 when they are stored g
    lr: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    weight_decay: float
    bias_correction1: float
    inv_eps: float  # 1 / eps, for the penalty (diagnostics only)
    bias_correction2: float
    inv_sqrt_bias_correction2: float  # 1 / bias_correction2 ** 0.5
    mean_age1: float
    mean_age2: float
    hvp_scale: float
    shrink: float  # 1 - lr * weight_decay when decoupled, else 1
    step_size: float  # lr in memoryless mode, else lr / bias_correction1
    correction_lr2: float  # correction * lr * lr
    kappa_lr: float  # correction_limit * lr / DIAG_SCALE: the bound is formed from F (u) scaled by DIAG_SCALE
    tau: float  # the probe pass's displacement
    diag_scale: float  # DIAG_SCALE, and the next three times DIAG_SCALE (diagnostics only)
    diag_lr: float
    diag_weight_decay: float
    diag_inv_bias_correction1: float
    penalty_limit: float  # a quarter of the dtype's largest value (see _penalty.py)


class LionScalars(NamedTuple):
    zero: float
    one: float
    inv_scale: float
    ref_inv_scale: float
    lr: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    weight_decay: float
    smoothing: float
    ema_weight: float
    age_weight: float
    hvp_scale: float
    shrink: float  # 1 - lr * weight_decay
    correction_lr2: float
    kappa_lr: float  # correction_limit * lr / DIAG_SCALE, as AdamW's
    tau: float
    diag_scale: float
    diag_lr: float
    diag_weight_decay: float


class SGDScalars(NamedTuple):
    zero: float
    one: float
    half: float
    inv_scale: float
    ref_inv_scale: float
    lr: float
    momentum: float
    weight_decay: float
    update_scale: float
    memory_coef: float
    hvp_scale: float
    correction_lr2: float
    kappa_lr: float  # correction_limit * lr (SGD's F and u are not scaled)
    tau: float
    diag_scale: float
    diag_lr: float


DIAG_SCALE = 2.0 ** -4


@_jit
def load_grad(grad, inv_scale, scaled):
    """reference.load_grad with the maximize sign folded into inv_scale: -(x * s) == x * (-s) exactly.

    Without a grad scale or maximize (scaled False) inv_scale is 1 and x * 1 == x, so the multiply is
    left out: the diagnostics loop is bound by its multiplies, and each is ~2.5% of it.
    """
    return grad * inv_scale if scaled else grad


@_jit
def estimate_hvp(g_ref, g, hvp_scale):
    """reference.estimate_hvp."""
    return (g_ref - g) * hvp_scale


@_jit
def descend(p, shrink, step_size, step, M, correction_lr2, update, kappa_lr, correct):
    """reference.descend, returning p and limited; multiplying by shrink == 1 is exact, so it is not skipped.

    kappa_lr * |update| is the reference's bound wherever scaling update by DIAG_SCALE (and kappa_lr by
    its inverse) is exact, that is, short of subnormals; AdamW's F is formed as the diagnostics form it,
    an ulp or so from the reference's. The bound is +0, positive, +Inf or NaN, and
    where the limit acts term is neither 0 nor NaN, so copysign is the reference's
    where(term < 0, -bound, bound), in one instruction instead of three.
    """
    p = p * shrink
    p = p - step_size * step
    limited = False
    if correct:
        term = correction_lr2 * M
        bound = kappa_lr * abs(update)
        limited = abs(term) > bound
        term = np.copysign(bound, term) if limited else term
        p = p - term
    return p, limited


@njit(error_model="numpy", forceinline=True, fastmath={"contract"})
def scaled_sum(x, diag_scale, diag_y):
    """x * DIAG_SCALE + diag_y as one multiply-add (diag_y already scaled)."""
    return x * diag_scale + diag_y


@_jit
def diagnostics(F, u, M, penalty, sign_flips, limited, c):
    """reference.diagnostics on F, u and lr M scaled by DIAG_SCALE; the kernel squares the first four."""
    hM = c.diag_lr * M
    memory = F - u
    residual = memory - hM
    return (F, hM, memory, residual, penalty, sign_flips, c.one if limited else c.zero)


@_jit
def sign(x, one, zero):
    """torch.sign: -1, 0 or 1; NaN and -0 give +0."""
    return one if x > zero else (-one if x < zero else zero)


@_jit
def smooth_sign(x, smoothing, smooth, one, zero):
    """phi_eps(x) = x / sqrt(x^2 + eps); sign(x) when not smooth (smoothing == 0)."""
    return x / np.sqrt(x * x + smoothing) if smooth else sign(x, one, zero)


@_jit
def smooth_sign_slope(x, smoothing, smooth, one, zero):
    """phi'_eps(x) = eps / (x^2 + eps)^(3/2); zero for sign."""
    if not smooth:
        return zero
    s = x * x + smoothing
    return one / (s * np.sqrt(s)) * smoothing


@_jit
def decay_term(weight_decay, p, zero):
    """reference.decay_term: weight_decay * p, or zero when weight_decay == 0 (0 * inf is NaN). A select
    on a loop-invariant scalar, so the loops still vectorize."""
    return weight_decay * p if weight_decay != zero else zero


@_jit
def adamw(p, g, states, hvp, c, flags):
    """ops/adamw.py's adamw; returns (p, (exp_avg, exp_avg_sq), g_raw, diag terms).

    The states follow the reference's operations. Divisions are the dearest
    instructions here (a 16-lane division holds Zen 4's divider for about 6 cycles, a
    square root for 10), so with eps outside the square root denom multiplies by a
    reciprocal where the reference divides, coef multiplies by 1 / a, and so does g / a
    where it reaches neither the step nor hvp (decoupled, not memoryless; through u, it
    bounds the correction term where the limit acts): p moves by about an ulp of the
    step; NaN and Inf land where the reference's do, which tests/test_numba.py checks.
    Where eps is outside the square root, the penalty term is |g|: the kernel turns
    the sum of |g| into the sum of |g| - eps log1p(|g| / eps) (see _penalty.py).
    """
    exp_avg, exp_avg_sq = states
    decoupled, eps_inside_sqrt, memoryless, correct, has_hvp = flags
    g_raw = g
    if not decoupled:
        g = g + decay_term(c.weight_decay, p, c.zero)  # coupled L2: the EMAs see g~ = g + lambda theta
    exp_avg = exp_avg + c.one_minus_beta1 * (g - exp_avg)
    exp_avg_sq = c.beta2 * exp_avg_sq + c.one_minus_beta2 * g * g
    if eps_inside_sqrt:
        denom = np.sqrt(exp_avg_sq / c.bias_correction2 + c.eps)
        a = np.sqrt(g * g + c.eps)
        penalty = a
    else:
        denom = np.sqrt(exp_avg_sq) * c.inv_sqrt_bias_correction2 + c.eps
        a = abs(g) + c.eps
        # decoupled: |g|, which the kernel turns into |g| - eps log1p(|g| / eps) (_penalty.py); coupled, g is
        # g + lambda theta, which _penalty.py cannot read again: the term itself
        penalty = abs(g) if decoupled else abs(g) - c.eps * log1p(abs(g) / c.eps)
    inv_a = c.one / a
    g_over_a = g / a if memoryless or not decoupled else g * inv_a  # exact where it is the step or enters hvp
    if eps_inside_sqrt:
        coef = inv_a * c.mean_age1 - c.mean_age2 * (g_over_a * g_over_a) * inv_a
    else:
        coef = (c.mean_age1 - c.mean_age2 * abs(g_over_a)) * inv_a
    step = exp_avg / denom
    decay = decay_term(c.diag_weight_decay, p, c.zero) if decoupled else c.zero
    F = scaled_sum(step, c.diag_inv_bias_correction1, decay)  # reference: exp_avg / bias_correction1 / denom + decay
    u = scaled_sum(g_over_a, c.diag_scale, decay)
    if has_hvp:
        if not decoupled:
            hvp = hvp + c.weight_decay * g_over_a  # H~ = H + lambda I; u = g / a when coupled
        M = coef * hvp
    else:
        M = c.zero
    p, limited = descend(p, c.shrink, c.step_size, g_over_a if memoryless else step, M, c.correction_lr2,
                         u if memoryless else F, c.kappa_lr, correct)
    diag = diagnostics(F, u, M, penalty, c.zero, limited, c)
    return p, (exp_avg, exp_avg_sq), g_raw, diag


@_jit
def lion(p, g, states, hvp, c, flags):
    """ops/lion.py's lion; returns (p, (exp_avg,), g, diag terms)."""
    (exp_avg,) = states
    smooth, memoryless, correct, has_hvp = flags
    cm = c.beta1 * exp_avg + c.one_minus_beta1 * g  # reference.py's c (c here holds the scalars)
    wg = c.ema_weight * g  # W_n g: c_n with every past gradient replaced by the current one
    decay = decay_term(c.diag_weight_decay, p, c.zero)
    phi_c = smooth_sign(cm, c.smoothing, smooth, c.one, c.zero)
    phi_wg = smooth_sign(wg, c.smoothing, smooth, c.one, c.zero)
    F = scaled_sum(phi_c, c.diag_scale, decay)
    u = scaled_sum(phi_wg, c.diag_scale, decay)
    if has_hvp:
        M = smooth_sign_slope(wg, c.smoothing, smooth, c.one, c.zero) * c.age_weight * hvp
    else:
        M = c.zero
    exp_avg = c.beta2 * exp_avg + c.one_minus_beta2 * g
    penalty = np.sqrt(wg * wg + c.smoothing)
    sign_flips = c.one if sign(cm, c.one, c.zero) != sign(g, c.one, c.zero) else c.zero
    step = phi_wg if memoryless else phi_c
    p, limited = descend(p, c.shrink, c.lr, step, M, c.correction_lr2, u if memoryless else F, c.kappa_lr, correct)
    diag = diagnostics(F, u, M, penalty, sign_flips, limited, c)
    return p, (exp_avg,), g, diag


@_jit
def sgd(p, g, states, hvp, c, flags):
    """ops/sgd.py's sgd; returns (p, (momentum_buffer,), g_raw, diag terms). Without momentum the buffer is
    absent: the kernel loads it as zero and stores nothing."""
    (momentum_buffer,) = states
    has_momentum, nesterov, memoryless, correct, has_hvp = flags
    g_raw = g
    g = g + decay_term(c.weight_decay, p, c.zero)  # g~
    if has_momentum:
        momentum_buffer = c.momentum * momentum_buffer + g
        F = g + c.momentum * momentum_buffer if nesterov else momentum_buffer
    else:
        F = g
    u = c.update_scale * g
    if has_hvp:
        hvp = hvp + c.weight_decay * g  # H~ g~ = H g~ + lambda g~
        M = c.memory_coef * hvp
    else:
        M = c.zero
    update = u if memoryless else F
    p, limited = descend(p, c.one, c.lr, update, M, c.correction_lr2, update, c.kappa_lr, correct)
    diag = diagnostics(F * c.diag_scale, u * c.diag_scale, M, c.half * g * g, c.zero, limited, c)
    return p, (momentum_buffer,), g_raw, diag


# The memoryless directions of reference.py, for the probe pass: the steps' u with exact divisions, since d
# reaches p. They take the op's scalars and the op's direction flags.

@_jit
def adamw_direction(p, g, c, decoupled, eps_inside_sqrt):
    """ops/adamw.py's adamw_direction."""
    if not decoupled:
        g = g + decay_term(c.weight_decay, p, c.zero)
    a = np.sqrt(g * g + c.eps) if eps_inside_sqrt else abs(g) + c.eps
    u = g / a
    return u + decay_term(c.weight_decay, p, c.zero) if decoupled else u


@_jit
def lion_direction(p, g, c, smooth):
    """ops/lion.py's lion_direction."""
    return smooth_sign(c.ema_weight * g, c.smoothing, smooth, c.one, c.zero) + decay_term(c.weight_decay, p, c.zero)


@_jit
def sgd_direction(p, g, c):
    """ops/sgd.py's sgd_direction: g~."""
    return g + decay_term(c.weight_decay, p, c.zero)


class AdEMAMixScalars(NamedTuple):
    zero: float
    one: float
    inv_scale: float
    ref_inv_scale: float
    lr: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    one_minus_beta3: float
    alpha: float
    eps: float
    weight_decay: float
    bias_correction1: float
    bias_correction2_sqrt: float
    update_scale: float  # c_n = 1 + alpha S_n
    age_sum: float  # A1 + alpha Y3
    scaled_age2: float  # c_n B
    hvp_scale: float
    shrink: float  # 1 - lr * weight_decay
    correction_lr2: float
    kappa_lr: float  # correction_limit * lr (F and u are not scaled)
    tau: float
    diag_scale: float
    diag_lr: float


@_jit
def ademamix(p, g, states, hvp, c, flags):
    """ops/ademamix.py's ademamix; returns (p, (exp_avg, exp_avg_slow, exp_avg_sq), g, diag terms)."""
    exp_avg, exp_avg_slow, exp_avg_sq = states
    memoryless, correct, has_hvp = flags
    exp_avg = exp_avg + c.one_minus_beta1 * (g - exp_avg)
    exp_avg_slow = exp_avg_slow + c.one_minus_beta3 * (g - exp_avg_slow)
    exp_avg_sq = c.beta2 * exp_avg_sq + c.one_minus_beta2 * g * g
    decay = decay_term(c.weight_decay, p, c.zero)
    denom = np.sqrt(exp_avg_sq) / c.bias_correction2_sqrt + c.eps
    step = (exp_avg / c.bias_correction1 + c.alpha * exp_avg_slow) / denom
    a = abs(g) + c.eps
    g_over_a = g / a
    memoryless_step = c.update_scale * g_over_a
    F = step + decay
    u = memoryless_step + decay
    M = (c.age_sum - c.scaled_age2 * abs(g_over_a)) / a * hvp if has_hvp else c.zero
    penalty = abs(g) - c.eps * log1p(abs(g) / c.eps)
    p, limited = descend(p, c.shrink, c.lr, memoryless_step if memoryless else step, M, c.correction_lr2,
                         u if memoryless else F, c.kappa_lr, correct)
    diag = diagnostics(F * c.diag_scale, u * c.diag_scale, M, penalty, c.zero, limited, c)
    return p, (exp_avg, exp_avg_slow, exp_avg_sq), g, diag


@_jit
def ademamix_direction(p, g, c):
    """ops/ademamix.py's ademamix_direction."""
    return g / (abs(g) + c.eps) * c.update_scale + decay_term(c.weight_decay, p, c.zero)


@_jit
def probe(p, d, tau):
    """reference.probe: (theta + tau d, theta^2, d^2)."""
    return p + tau * d, p * p, d * d


@_jit
def kahan(p, p_new, c):
    """reference.kahan on float32 values: q (exact in bfloat16) and the new compensation."""
    y = (p_new - p) + c
    q = bf16_nearest(p + y)
    c = y - (q - p)
    return q, c


def adamw_log_penalty(decoupled: bool, eps_inside_sqrt: bool, memoryless: bool) -> bool:
    """Decoupled AdamW with eps outside the square root: the penalty term is |g| (the raw gradient's, which
    _penalty.py can read again), summed as |g| - eps log1p(|g| / eps)."""
    return decoupled and not eps_inside_sqrt


def no_log_penalty(*flags: bool) -> bool:
    return False


class Element(NamedTuple):
    """What the one driver kernel (kernels.step_kernel) takes from an op, beside its flags."""

    step: Callable  # (p, g, states, hvp, c, (*flags, correct, has_hvp)) -> (p, states, g_raw, diag)
    direction: Callable  # (p, g, c, *direction_flags) -> d, for the probe pass
    sign_flips: bool  # the sign-flip term can be nonzero, so it is summed
    log_penalty: Callable[..., bool]  # (*flags) -> the penalty term is |g|, summed by _penalty.py
    narrow_vectors: bool  # the loop is built for 256-bit vectors (see kernels.prefer_256_bit_vectors)
    # The loop loads the states before theta. No value depends on it, but LLVM's interleave count does, and
    # with it the order in which the diagnostics are summed: each op keeps the order its results were made in.
    states_first: bool


ELEMENTS = {"adamw": Element(adamw, adamw_direction, False, adamw_log_penalty, False, False),
            "lion": Element(lion, lion_direction, True, no_log_penalty, False, False),
            "sgd": Element(sgd, sgd_direction, False, no_log_penalty, True, True),
            "ademamix": Element(ademamix, ademamix_direction, False, no_log_penalty, False, False)}


def reciprocal(x: float) -> float:
    """1 / x, with 1 / 0 = inf signed like 0 (as the division it stands for gives in the kernel)."""
    return 1.0 / x if x != 0.0 else math.copysign(math.inf, x)


# ---------------------------------------------------------------- what differs between the ops
# k: the call's scalars by name (the op's, correction, correction_limit, hvp_scale, memoryless, probe_tau);
# d: the op's derived scalars (SPECS[op].derive); common: the fields every op's scalars record has.

def _adamw_scalars(k: dict, d: dict, common: dict, dtype: type) -> AdamWScalars:
    return AdamWScalars(
        **common, one_minus_beta1=d["one_minus_beta1"], beta2=k["beta2"], one_minus_beta2=d["one_minus_beta2"],
        eps=k["eps"], weight_decay=k["weight_decay"], bias_correction1=k["bias_correction1"],
        inv_eps=reciprocal(k["eps"]), bias_correction2=k["bias_correction2"],
        inv_sqrt_bias_correction2=reciprocal(d["bias_correction2_sqrt"]), mean_age1=k["mean_age1"],
        mean_age2=k["mean_age2"], shrink=d["shrink"], step_size=d["step_size"], kappa_lr=d["kappa_lr"] / DIAG_SCALE,
        diag_weight_decay=k["weight_decay"] * DIAG_SCALE,
        diag_inv_bias_correction1=reciprocal(k["bias_correction1"]) * DIAG_SCALE,
        penalty_limit=float(np.finfo(dtype).max) / 4)


def _lion_scalars(k: dict, d: dict, common: dict, dtype: type) -> LionScalars:
    return LionScalars(
        **common, beta1=k["beta1"], one_minus_beta1=d["one_minus_beta1"], beta2=k["beta2"],
        one_minus_beta2=d["one_minus_beta2"], weight_decay=k["weight_decay"], smoothing=k["smoothing"],
        ema_weight=k["ema_weight"], age_weight=k["age_weight"], shrink=d["shrink"],
        kappa_lr=d["kappa_lr"] / DIAG_SCALE, diag_weight_decay=k["weight_decay"] * DIAG_SCALE)


def _sgd_scalars(k: dict, d: dict, common: dict, dtype: type) -> SGDScalars:
    return SGDScalars(**common, half=0.5, momentum=k["momentum"], weight_decay=k["weight_decay"],
                      update_scale=k["update_scale"], memory_coef=k["memory_coef"], kappa_lr=d["kappa_lr"])


def _ademamix_scalars(k: dict, d: dict, common: dict, dtype: type) -> AdEMAMixScalars:
    return AdEMAMixScalars(
        **common, one_minus_beta1=d["one_minus_beta1"], beta2=k["beta2"], one_minus_beta2=d["one_minus_beta2"],
        one_minus_beta3=d["one_minus_beta3"], alpha=k["alpha"], eps=k["eps"], weight_decay=k["weight_decay"],
        bias_correction1=k["bias_correction1"], bias_correction2_sqrt=d["bias_correction2_sqrt"],
        update_scale=d["update_scale"], age_sum=d["age_sum"], scaled_age2=d["scaled_age2"], shrink=d["shrink"],
        kappa_lr=d["kappa_lr"])


class HostOp(NamedTuple):
    """The numba-only part of an op's host wrapper."""

    scalars: Callable[[dict, dict, dict, type], NamedTuple]  # (k, d, common, compute dtype) -> the kernel's record
    flags: Callable[[dict, tuple], tuple[tuple[bool, ...], tuple[bool, ...]]]  # (k, state lists) -> the
    # step's flags (elements.ELEMENTS[op].step's) and the direction's, compile-time constants of the kernels


HOST_OPS = {
    "adamw": HostOp(_adamw_scalars, lambda k, states: ((k["decoupled"], k["eps_inside_sqrt"], k["memoryless"]),
                                                       (k["decoupled"], k["eps_inside_sqrt"]))),
    "lion": HostOp(_lion_scalars, lambda k, states: ((k["smoothing"] != 0.0, k["memoryless"]),
                                                     (k["smoothing"] != 0.0,))),
    # SGD's buffer list is empty without momentum: has_momentum
    "sgd": HostOp(_sgd_scalars, lambda k, states: ((bool(states[0]), k["nesterov"], k["memoryless"]), ())),
    "ademamix": HostOp(_ademamix_scalars, lambda k, states: ((k["memoryless"],), ())),
}
