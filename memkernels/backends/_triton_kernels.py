"""Triton kernels: reference.py's adamw, lion and sgd, one launch per op call.

Each program updates one tile of BLOCK elements of one tensor. The launch reads
two int64 tables built by _triton_table.py: a pointer table (one row per
tensor: the data address of each list's tensor, in the columns params, grads,
the op's states, grad_refs, origins, hvps, then its numel) and a block map (per
program: the table row and the first element of its tile). The addresses are
cast to typed pointers in the kernel; this works compiled and under
TRITON_INTERPRET=1 on CPU tensors, where the interpreter dereferences the host
addresses directly.

Full tiles take an unmasked path (with a 16-byte alignment hint when every
tensor of the call is 16-byte aligned, so that loads and stores vectorize);
only the last tile of a tensor is masked. Every flag that is constant for a
call is a tl.constexpr, so a disabled feature costs nothing. Math is fp32 with
IEEE division and square root (tl.div_rn, tl.sqrt_rn) in the order of
reference.py; results are rounded once to each list's dtype on write-back.

A launch is either a step or (PROBE) the probe pass of backends/reference.py,
which moves theta to theta + tau d and keeps theta in the origins, read back by
the step that follows (HAS_ORIGIN). tau arrives as a float64 tensor
(probe_tau): in a step it replaces hvp_scale by 1 / tau.

The scalars that change from step to step (memkernels._ops.STEP_SCALARS) arrive
either as float arguments derived on the host, or (DEVICE_SCALARS) in a float64
tensor that each program reads: the kernel then derives lr / bias_correction1,
1 - lr * weight_decay, correction * lr * lr, ... itself in float64, in the
host's order, and rounds each once to fp32 as the launch rounds a float
argument. Both give the same bits; only the second lets a captured CUDA graph
or a compiled step change lr without the host.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Slots of the diagnostics tensor (reference.DIAGNOSTICS).
_UPDATE_SQ, _CORRECTION_SQ, _MEMORY_SQ, _RESIDUAL_SQ, _PENALTY_SUM, _SIGN_FLIPS, _LIMITED = (
    tl.constexpr(k) for k in range(7))


# ------------------------------------------------------------------ memory access

@triton.jit
def _tile(table, row, col: tl.constexpr, start, DT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Pointers to the tile [start, start + BLOCK) of the tensor in column col of a table row."""
    base = tl.load(table + row + col).to(tl.pointer_type(DT))
    ptrs = (base + start) + tl.arange(0, BLOCK)
    if ALIGNED:
        ptrs = tl.multiple_of(ptrs, 16)
    return ptrs


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x.to(tl.float32)


@triton.jit
def _round_bf16(x):
    """fp32 -> bf16 rounded to nearest even in integer arithmetic (NaN stays NaN).

    The interpreter's own fp32 -> bf16 conversion truncates; compiled code uses
    the hardware conversion, which rounds to nearest even.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), rounded)


@triton.jit
def _store(ptrs, x, mask, DT: tl.constexpr, MASKED: tl.constexpr, SOFT_BF16: tl.constexpr):
    if DT == tl.bfloat16 and SOFT_BF16:
        y = _round_bf16(x)
    else:
        y = x.to(DT)
    if MASKED:
        tl.store(ptrs, y, mask=mask)
    else:
        tl.store(ptrs, y)


@triton.jit
def _load_grad(ptrs, mask, inv_scale, MASKED: tl.constexpr, HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr):
    """reference.load_grad: unscale (AMP), then negate when maximizing."""
    g = _load(ptrs, mask, MASKED)
    if HAS_SCALE:
        g = g * inv_scale
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _load_ref(ptrs, mask, inv_scale, MASKED: tl.constexpr, HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
              UPDATE_REFS: tl.constexpr):
    """g_ref: a stored processed gradient (trajectory) as is, a raw probe/exact gradient like grads."""
    if UPDATE_REFS:
        g_ref = _load(ptrs, mask, MASKED)
    else:
        g_ref = _load_grad(ptrs, mask, inv_scale, MASKED, HAS_SCALE, MAXIMIZE)
    return g_ref


@triton.jit
def _load_theta(table, row, o_col: tl.constexpr, start, mask, P: tl.constexpr, MASKED: tl.constexpr,
                HAS_ORIGIN: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """The params' pointers and theta: read from the origins (column o_col) in a step after a probe pass."""
    p_ptrs = _tile(table, row, 0, start, P, ALIGNED, BLOCK)
    if HAS_ORIGIN:
        p = _load(_tile(table, row, o_col, start, P, ALIGNED, BLOCK), mask, MASKED)
    else:
        p = _load(p_ptrs, mask, MASKED)
    return p_ptrs, p


@triton.jit
def _estimate_hvp(g_ref, g, hvp_scale):
    """reference.estimate_hvp."""
    return (g_ref - g) * hvp_scale


@triton.jit
def _hvp(table, row, r_col: tl.constexpr, start, mask, g, inv_scale, hvp_scale, R: tl.constexpr, H: tl.constexpr,
         MASKED: tl.constexpr, HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, UPDATE_REFS: tl.constexpr,
         REUSE_HVP: tl.constexpr, STORE_HVP: tl.constexpr, ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr,
         BLOCK: tl.constexpr):
    """H d as backends/reference.py gets it for the op math: a kept estimate (hvps, column r_col + 2), or the
    estimate from g_ref (grad_refs, column r_col), kept in hvps when STORE_HVP."""
    if REUSE_HVP:
        hvp = _load(_tile(table, row, r_col + 2, start, H, ALIGNED, BLOCK), mask, MASKED)
    else:
        r_ptrs = _tile(table, row, r_col, start, R, ALIGNED, BLOCK)
        g_ref = _load_ref(r_ptrs, mask, inv_scale, MASKED, HAS_SCALE, MAXIMIZE, UPDATE_REFS)
        hvp = _estimate_hvp(g_ref, g, hvp_scale)
        if STORE_HVP:
            _store(_tile(table, row, r_col + 2, start, H, ALIGNED, BLOCK), hvp, mask, H, MASKED, SOFT_BF16)
    return hvp


# ------------------------------------------------------------------ shared math

@triton.jit
def _descend(p, shrink, step_size, step, M, correction_lr2, update, kappa_lr, SHRINK: tl.constexpr,
             CORRECTION: tl.constexpr):
    """reference.descend; shrink, correction * lr^2 and correction_limit * lr come precomputed from the host."""
    if SHRINK:
        p = p * shrink
    p = p - step_size * step
    limited = tl.zeros(p.shape, tl.int1)
    if CORRECTION:
        term = correction_lr2 * M
        bound = kappa_lr * tl.abs(update)
        limited = tl.abs(term) > bound
        term = tl.where(limited, tl.where(term < 0, -bound, bound), term)
        p = p - term
    return p, limited


@triton.jit
def _sum_into(diagnostics, slot: tl.constexpr, term, mask, MASKED: tl.constexpr):
    """Add this tile's float64 sum of one diagnostic term to its slot."""
    if MASKED:
        term = tl.where(mask, term, 0.0)
    tl.atomic_add(diagnostics + slot, tl.sum(term.to(tl.float64), axis=0), sem="relaxed")


@triton.jit
def _diagnostics(diagnostics, F, u, M, lr, penalty, sign_flips, limited, mask, MASKED: tl.constexpr,
                 HAS_FLIPS: tl.constexpr, HAS_LIMITED: tl.constexpr):
    """reference.diagnostics, reduced per tile; sign_flips (limited) is all zeros unless HAS_FLIPS (HAS_LIMITED)."""
    hM = lr * M
    memory = F - u
    residual = memory - hM
    _sum_into(diagnostics, _UPDATE_SQ, F * F, mask, MASKED)
    _sum_into(diagnostics, _CORRECTION_SQ, hM * hM, mask, MASKED)
    _sum_into(diagnostics, _MEMORY_SQ, memory * memory, mask, MASKED)
    _sum_into(diagnostics, _RESIDUAL_SQ, residual * residual, mask, MASKED)
    _sum_into(diagnostics, _PENALTY_SUM, penalty, mask, MASKED)
    if HAS_FLIPS:
        _sum_into(diagnostics, _SIGN_FLIPS, sign_flips, mask, MASKED)
    if HAS_LIMITED:
        _sum_into(diagnostics, _LIMITED, limited.to(tl.float32), mask, MASKED)


@triton.jit
def _decay_term(weight_decay, p):
    """reference.decay_term: weight_decay * p, or 0 when weight_decay == 0 (0 * inf is NaN). A branch on the
    scalar rather than tl.where, so that the interpreter does not form 0 * inf (and warn) to discard it."""
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


@triton.jit
def _program(blocks, found_inf, HAS_INF: tl.constexpr):
    """This program's tensor (its row of the pointer table) and tile start; go is False when AMP found an inf."""
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(blocks + 2 * pid)
    start = tl.load(blocks + 2 * pid + 1)
    go = True
    if HAS_INF:
        go = tl.load(found_inf).to(tl.float32) == 0.0
    return row, start, go


@triton.jit
def _inv_scale(grad_scale, HAS_SCALE: tl.constexpr):
    """1 / grad_scale in float64, rounded to fp32 like the reference's python scalar."""
    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = (1.0 / tl.load(grad_scale).to(tl.float64)).to(tl.float32)
    return inv_scale


@triton.jit
def _shared_step_scalars(step_scalars, correction64, correction_limit64):
    """lr (the first of every op's STEP_SCALARS), correction * lr * lr and correction_limit * lr, in float64."""
    lr = tl.load(step_scalars)
    return lr, correction64 * lr * lr, correction_limit64 * lr


@triton.jit
def _inverse_tau(probe_tau):
    """The hvp_scale that probe_tau replaces in a step: 1 / tau in float64 (0 for tau = 0, the host's rule),
    rounded to fp32."""
    tau = tl.load(probe_tau)
    return tl.where(tau > 0.0, 1.0 / tau, 0.0).to(tl.float32)


# ------------------------------------------------------------------ probe pass

@triton.jit
def _probe(p, d, tau):
    """reference.probe: theta + tau d, and theta^2, d^2 for the next tau."""
    return p + tau * d, p * p, d * d


@triton.jit
def _probe_tile(table, row, start, n, probe_norms, inv_scale, tau, weight_decay, eps, smoothing, ema_weight,
                OP: tl.constexpr, o_col: tl.constexpr, MASKED: tl.constexpr, P: tl.constexpr,
                DECOUPLED: tl.constexpr, EPS_INSIDE_SQRT: tl.constexpr, SIGN: tl.constexpr, MAXIMIZE: tl.constexpr,
                HAS_SCALE: tl.constexpr, NORMS: tl.constexpr, ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr,
                BLOCK: tl.constexpr):
    """backends/reference.py's probe pass on one tile: theta kept in the origins (column o_col), theta + tau d
    into params, and the tile's float64 sums of theta^2 and d^2 added to probe_norms."""
    mask = tl.arange(0, BLOCK) < n - start
    p_ptrs = _tile(table, row, 0, start, P, ALIGNED, BLOCK)
    p = _load(p_ptrs, mask, MASKED)
    g = _load_grad(_tile(table, row, 1, start, P, ALIGNED, BLOCK), mask, inv_scale, MASKED, HAS_SCALE, MAXIMIZE)
    if OP == "adamw":
        d = _adamw_direction(p, g, eps, weight_decay, DECOUPLED, EPS_INSIDE_SQRT)
    elif OP == "lion":
        d = _lion_direction(p, g, weight_decay, smoothing, ema_weight, SIGN)
    else:
        d = _sgd_direction(p, g, weight_decay)
    moved, theta_sq, d_sq = _probe(p, d, tau)
    _store(_tile(table, row, o_col, start, P, ALIGNED, BLOCK), p, mask, P, MASKED, SOFT_BF16)
    _store(p_ptrs, moved, mask, P, MASKED, SOFT_BF16)
    if NORMS:
        _sum_into(probe_norms, 0, theta_sq, mask, MASKED)
        _sum_into(probe_norms, 1, d_sq, mask, MASKED)


@triton.jit
def _probe_program(table, row, start, n, probe_tau, probe_norms, inv_scale, weight_decay, eps, smoothing,
                   ema_weight, OP: tl.constexpr, o_col: tl.constexpr, P: tl.constexpr, DECOUPLED: tl.constexpr,
                   EPS_INSIDE_SQRT: tl.constexpr, SIGN: tl.constexpr, MAXIMIZE: tl.constexpr,
                   HAS_SCALE: tl.constexpr, NORMS: tl.constexpr, ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr,
                   BLOCK: tl.constexpr):
    """One program's probe tile, with tau read on the device and rounded to fp32."""
    tau = tl.load(probe_tau).to(tl.float32)
    if start + BLOCK <= n:
        _probe_tile(table, row, start, n, probe_norms, inv_scale, tau, weight_decay, eps, smoothing, ema_weight,
                    OP, o_col, False, P, DECOUPLED, EPS_INSIDE_SQRT, SIGN, MAXIMIZE, HAS_SCALE, NORMS, ALIGNED,
                    SOFT_BF16, BLOCK)
    else:
        _probe_tile(table, row, start, n, probe_norms, inv_scale, tau, weight_decay, eps, smoothing, ema_weight,
                    OP, o_col, True, P, DECOUPLED, EPS_INSIDE_SQRT, SIGN, MAXIMIZE, HAS_SCALE, NORMS, ALIGNED,
                    SOFT_BF16, BLOCK)


# ------------------------------------------------------------------ adamw

@triton.jit
def _adamw_tile(table, row, start, n, diagnostics, inv_scale,
                lr, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay,
                bias_correction1, bias_correction2, bias_correction2_sqrt, mean_age1, mean_age2,
                hvp_scale, shrink, step_size, correction_lr2, kappa_lr,
                MASKED: tl.constexpr, P: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, R: tl.constexpr,
                H: tl.constexpr, HAS_REF: tl.constexpr, UPDATE_REFS: tl.constexpr, HAS_ORIGIN: tl.constexpr,
                STORE_HVP: tl.constexpr, REUSE_HVP: tl.constexpr, DIAG: tl.constexpr,
                MEMORYLESS: tl.constexpr, CORRECTION: tl.constexpr, EPS_INSIDE_SQRT: tl.constexpr,
                DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
                ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    mask = tl.arange(0, BLOCK) < n - start
    p_ptrs, p = _load_theta(table, row, 5, start, mask, P, MASKED, HAS_ORIGIN, ALIGNED, BLOCK)
    g_ptrs = _tile(table, row, 1, start, P, ALIGNED, BLOCK)
    m_ptrs = _tile(table, row, 2, start, S1, ALIGNED, BLOCK)
    v_ptrs = _tile(table, row, 3, start, S2, ALIGNED, BLOCK)
    g = _load_grad(g_ptrs, mask, inv_scale, MASKED, HAS_SCALE, MAXIMIZE)
    exp_avg = _load(m_ptrs, mask, MASKED)
    exp_avg_sq = _load(v_ptrs, mask, MASKED)
    NEED_M: tl.constexpr = (HAS_REF or REUSE_HVP) and (CORRECTION or DIAG)
    if NEED_M or STORE_HVP:
        hvp = _hvp(table, row, 4, start, mask, g, inv_scale, hvp_scale, R, H, MASKED, HAS_SCALE, MAXIMIZE,
                   UPDATE_REFS, REUSE_HVP, STORE_HVP, ALIGNED, SOFT_BF16, BLOCK)

    g_raw = g
    if not DECOUPLED:
        g = g + _decay_term(weight_decay, p)
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * g * g
    decay = 0.0
    if DECOUPLED:
        decay = _decay_term(weight_decay, p)
    # What a step does not use (F and u without a correction or diagnostics, ...) the compiler drops.
    if EPS_INSIDE_SQRT:
        denom = tl.sqrt_rn(tl.div_rn(exp_avg_sq, bias_correction2) + eps)
        a = tl.sqrt_rn(g * g + eps)
        g_over_a = tl.div_rn(g, a)
        coef = _rdiv(mean_age1, a) - tl.div_rn(mean_age2 * (g_over_a * g_over_a), a)
        penalty = a
    else:
        denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
        a = tl.abs(g) + eps
        g_over_a = tl.div_rn(g, a)
        coef = tl.div_rn(mean_age1 - mean_age2 * tl.abs(g_over_a), a)
        penalty = tl.abs(g) - eps * _log1p(tl.div_rn(tl.abs(g), eps))
    F = tl.div_rn(tl.div_rn(exp_avg, bias_correction1), denom) + decay
    u = g_over_a + decay
    M = tl.zeros_like(p)
    if NEED_M:
        if not DECOUPLED:
            hvp = hvp + weight_decay * u
        M = coef * hvp
    if MEMORYLESS:
        p, limited = _descend(p, shrink, lr, g_over_a, M, correction_lr2, u, kappa_lr, DECOUPLED, CORRECTION)
    else:
        p, limited = _descend(p, shrink, step_size, tl.div_rn(exp_avg, denom), M, correction_lr2, F, kappa_lr,
                              DECOUPLED, CORRECTION)
    if DIAG:
        _diagnostics(diagnostics, F, u, M, lr, penalty, 0.0, limited, mask, MASKED, False, CORRECTION)

    _store(p_ptrs, p, mask, P, MASKED, SOFT_BF16)
    _store(m_ptrs, exp_avg, mask, S1, MASKED, SOFT_BF16)
    _store(v_ptrs, exp_avg_sq, mask, S2, MASKED, SOFT_BF16)
    if HAS_REF and UPDATE_REFS:
        _store(_tile(table, row, 4, start, R, ALIGNED, BLOCK), g_raw, mask, R, MASKED, SOFT_BF16)


@triton.jit
def _adamw_direction(p, g, eps, weight_decay, DECOUPLED: tl.constexpr, EPS_INSIDE_SQRT: tl.constexpr):
    """reference.adamw_direction: the step's u, by the same operations."""
    if not DECOUPLED:
        g = g + _decay_term(weight_decay, p)
    if EPS_INSIDE_SQRT:
        a = tl.sqrt_rn(g * g + eps)
    else:
        a = tl.abs(g) + eps
    u = tl.div_rn(g, a)
    if DECOUPLED:
        u = u + _decay_term(weight_decay, p)
    return u


@triton.jit
def _adamw_step_scalars(step_scalars, weight_decay64, correction64, correction_limit64):
    """STEP_SCALARS["adamw"] (lr, bias_correction1, bias_correction2, mean_age1, mean_age2, hvp_scale) and the
    host's derived shrink, step_size, correction_lr2 and kappa_lr, as _triton_ops.adamw computes them, rounded
    to fp32."""
    lr, correction_lr2, kappa_lr = _shared_step_scalars(step_scalars, correction64, correction_limit64)
    bias_correction1 = tl.load(step_scalars + 1)
    bias_correction2 = tl.load(step_scalars + 2)
    # The host's bias_correction2 ** 0.5 (libm pow) is the correctly rounded root but in the rarest cases;
    # fp64 sqrt is correctly rounded, and both are rounded once more to fp32 here.
    bias_correction2_sqrt = tl.sqrt(bias_correction2)
    shrink = 1 - lr * weight_decay64  # read only when DECOUPLED, as on the host
    step_size = lr / bias_correction1
    return (lr.to(tl.float32), bias_correction1.to(tl.float32), bias_correction2.to(tl.float32),
            bias_correction2_sqrt.to(tl.float32), tl.load(step_scalars + 3).to(tl.float32),
            tl.load(step_scalars + 4).to(tl.float32), tl.load(step_scalars + 5).to(tl.float32),
            shrink.to(tl.float32), step_size.to(tl.float32), correction_lr2.to(tl.float32), kappa_lr.to(tl.float32))


@triton.jit
def adamw_kernel(table, blocks, diagnostics, grad_scale, found_inf, step_scalars, probe_tau, probe_norms,
                 lr, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay,
                 bias_correction1, bias_correction2, bias_correction2_sqrt, mean_age1, mean_age2,
                 hvp_scale, shrink, step_size, correction_lr2, kappa_lr,
                 weight_decay64: tl.float64, correction64: tl.float64, correction_limit64: tl.float64,
                 DEVICE_SCALARS: tl.constexpr,
                 P: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, R: tl.constexpr, H: tl.constexpr,
                 HAS_REF: tl.constexpr, UPDATE_REFS: tl.constexpr, HAS_ORIGIN: tl.constexpr,
                 STORE_HVP: tl.constexpr, REUSE_HVP: tl.constexpr, PROBE: tl.constexpr, HAS_TAU: tl.constexpr,
                 NORMS: tl.constexpr, DIAG: tl.constexpr,
                 MEMORYLESS: tl.constexpr, CORRECTION: tl.constexpr, EPS_INSIDE_SQRT: tl.constexpr,
                 DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
                 HAS_INF: tl.constexpr, ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr,
                 NCOL: tl.constexpr, BLOCK: tl.constexpr):
    row, start, go = _program(blocks, found_inf, HAS_INF)
    if go:
        if DEVICE_SCALARS:
            (lr, bias_correction1, bias_correction2, bias_correction2_sqrt, mean_age1, mean_age2, hvp_scale,
             shrink, step_size, correction_lr2, kappa_lr) = _adamw_step_scalars(step_scalars, weight_decay64,
                                                                                correction64, correction_limit64)
        if HAS_TAU and not PROBE:
            hvp_scale = _inverse_tau(probe_tau)
        row = row * NCOL
        n = tl.load(table + row + NCOL - 1)
        inv_scale = _inv_scale(grad_scale, HAS_SCALE)
        if PROBE:
            _probe_program(table, row, start, n, probe_tau, probe_norms, inv_scale, weight_decay, eps, 0.0, 0.0,
                           "adamw", NCOL - 3, P, DECOUPLED, EPS_INSIDE_SQRT, False, MAXIMIZE, HAS_SCALE, NORMS,
                           ALIGNED, SOFT_BF16, BLOCK)
        elif start + BLOCK <= n:
            _adamw_tile(table, row, start, n, diagnostics, inv_scale, lr, beta2, one_minus_beta1,
                        one_minus_beta2, eps, weight_decay, bias_correction1, bias_correction2,
                        bias_correction2_sqrt, mean_age1, mean_age2, hvp_scale, shrink, step_size,
                        correction_lr2, kappa_lr, False, P, S1, S2, R, H, HAS_REF, UPDATE_REFS, HAS_ORIGIN,
                        STORE_HVP, REUSE_HVP, DIAG, MEMORYLESS, CORRECTION, EPS_INSIDE_SQRT, DECOUPLED, MAXIMIZE,
                        HAS_SCALE, ALIGNED, SOFT_BF16, BLOCK)
        else:
            _adamw_tile(table, row, start, n, diagnostics, inv_scale, lr, beta2, one_minus_beta1,
                        one_minus_beta2, eps, weight_decay, bias_correction1, bias_correction2,
                        bias_correction2_sqrt, mean_age1, mean_age2, hvp_scale, shrink, step_size,
                        correction_lr2, kappa_lr, True, P, S1, S2, R, H, HAS_REF, UPDATE_REFS, HAS_ORIGIN,
                        STORE_HVP, REUSE_HVP, DIAG, MEMORYLESS, CORRECTION, EPS_INSIDE_SQRT, DECOUPLED, MAXIMIZE,
                        HAS_SCALE, ALIGNED, SOFT_BF16, BLOCK)


# ------------------------------------------------------------------ lion

@triton.jit
def _smooth_sign(x, smoothing, SIGN: tl.constexpr):
    """reference.smooth_sign: sign(x), or x / sqrt(x^2 + smoothing)."""
    if SIGN:
        y = _sign(x)
    else:
        y = tl.div_rn(x, tl.sqrt_rn(x * x + smoothing))
    return y


@triton.jit
def _smooth_sign_slope(x, smoothing, SIGN: tl.constexpr):
    """reference.smooth_sign_slope: smoothing / (x^2 + smoothing)^(3/2); zero for sign."""
    if SIGN:
        y = tl.zeros_like(x)
    else:
        s = x * x + smoothing
        y = _rdiv(smoothing, s * tl.sqrt_rn(s))
    return y


@triton.jit
def _lion_tile(table, row, start, n, diagnostics, inv_scale,
               lr, beta1, beta2, one_minus_beta1, one_minus_beta2, weight_decay, smoothing,
               ema_weight, age_weight, hvp_scale, shrink, correction_lr2, kappa_lr,
               MASKED: tl.constexpr, P: tl.constexpr, S1: tl.constexpr, R: tl.constexpr, H: tl.constexpr,
               HAS_REF: tl.constexpr, UPDATE_REFS: tl.constexpr, HAS_ORIGIN: tl.constexpr,
               STORE_HVP: tl.constexpr, REUSE_HVP: tl.constexpr, DIAG: tl.constexpr,
               MEMORYLESS: tl.constexpr, CORRECTION: tl.constexpr, SIGN: tl.constexpr,
               MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
               ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    mask = tl.arange(0, BLOCK) < n - start
    p_ptrs, p = _load_theta(table, row, 4, start, mask, P, MASKED, HAS_ORIGIN, ALIGNED, BLOCK)
    g_ptrs = _tile(table, row, 1, start, P, ALIGNED, BLOCK)
    m_ptrs = _tile(table, row, 2, start, S1, ALIGNED, BLOCK)
    g = _load_grad(g_ptrs, mask, inv_scale, MASKED, HAS_SCALE, MAXIMIZE)
    exp_avg = _load(m_ptrs, mask, MASKED)
    NEED_M: tl.constexpr = (HAS_REF or REUSE_HVP) and (CORRECTION or DIAG)
    if NEED_M or STORE_HVP:
        hvp = _hvp(table, row, 3, start, mask, g, inv_scale, hvp_scale, R, H, MASKED, HAS_SCALE, MAXIMIZE,
                   UPDATE_REFS, REUSE_HVP, STORE_HVP, ALIGNED, SOFT_BF16, BLOCK)

    c = beta1 * exp_avg + one_minus_beta1 * g
    wg = ema_weight * g
    decay = _decay_term(weight_decay, p)
    phi_c = _smooth_sign(c, smoothing, SIGN)
    phi_wg = _smooth_sign(wg, smoothing, SIGN)  # dropped by the compiler where unused, as u is
    F = phi_c + decay
    u = phi_wg + decay
    M = tl.zeros_like(p)
    if NEED_M:
        M = _smooth_sign_slope(wg, smoothing, SIGN) * age_weight * hvp
    exp_avg = beta2 * exp_avg + one_minus_beta2 * g
    if MEMORYLESS:
        p, limited = _descend(p, shrink, lr, phi_wg, M, correction_lr2, u, kappa_lr, True, CORRECTION)
    else:
        p, limited = _descend(p, shrink, lr, phi_c, M, correction_lr2, F, kappa_lr, True, CORRECTION)
    if DIAG:
        penalty = tl.sqrt_rn(wg * wg + smoothing)
        sign_flips = (_sign(c) != _sign(g)).to(tl.float32)
        _diagnostics(diagnostics, F, u, M, lr, penalty, sign_flips, limited, mask, MASKED, True, CORRECTION)

    _store(p_ptrs, p, mask, P, MASKED, SOFT_BF16)
    _store(m_ptrs, exp_avg, mask, S1, MASKED, SOFT_BF16)
    if HAS_REF and UPDATE_REFS:
        _store(_tile(table, row, 3, start, R, ALIGNED, BLOCK), g, mask, R, MASKED, SOFT_BF16)


@triton.jit
def _lion_direction(p, g, weight_decay, smoothing, ema_weight, SIGN: tl.constexpr):
    """reference.lion_direction: the step's u = phi(W_n g) + decay."""
    return _smooth_sign(ema_weight * g, smoothing, SIGN) + _decay_term(weight_decay, p)


@triton.jit
def _lion_step_scalars(step_scalars, weight_decay64, correction64, correction_limit64):
    """STEP_SCALARS["lion"] (lr, ema_weight, age_weight, hvp_scale) and the host's derived shrink,
    correction_lr2 and kappa_lr, as _triton_ops.lion computes them, rounded to fp32."""
    lr, correction_lr2, kappa_lr = _shared_step_scalars(step_scalars, correction64, correction_limit64)
    shrink = 1 - lr * weight_decay64
    return (lr.to(tl.float32), tl.load(step_scalars + 1).to(tl.float32), tl.load(step_scalars + 2).to(tl.float32),
            tl.load(step_scalars + 3).to(tl.float32), shrink.to(tl.float32), correction_lr2.to(tl.float32),
            kappa_lr.to(tl.float32))


@triton.jit
def lion_kernel(table, blocks, diagnostics, grad_scale, found_inf, step_scalars, probe_tau, probe_norms,
                lr, beta1, beta2, one_minus_beta1, one_minus_beta2, weight_decay, smoothing,
                ema_weight, age_weight, hvp_scale, shrink, correction_lr2, kappa_lr,
                weight_decay64: tl.float64, correction64: tl.float64, correction_limit64: tl.float64,
                DEVICE_SCALARS: tl.constexpr, P: tl.constexpr, S1: tl.constexpr, R: tl.constexpr,
                H: tl.constexpr, HAS_REF: tl.constexpr, UPDATE_REFS: tl.constexpr, HAS_ORIGIN: tl.constexpr,
                STORE_HVP: tl.constexpr, REUSE_HVP: tl.constexpr, PROBE: tl.constexpr, HAS_TAU: tl.constexpr,
                NORMS: tl.constexpr, DIAG: tl.constexpr,
                MEMORYLESS: tl.constexpr, CORRECTION: tl.constexpr, SIGN: tl.constexpr,
                MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
                ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr, NCOL: tl.constexpr, BLOCK: tl.constexpr):
    row, start, go = _program(blocks, found_inf, HAS_INF)
    if go:
        if DEVICE_SCALARS:
            lr, ema_weight, age_weight, hvp_scale, shrink, correction_lr2, kappa_lr = _lion_step_scalars(
                step_scalars, weight_decay64, correction64, correction_limit64)
        if HAS_TAU and not PROBE:
            hvp_scale = _inverse_tau(probe_tau)
        row = row * NCOL
        n = tl.load(table + row + NCOL - 1)
        inv_scale = _inv_scale(grad_scale, HAS_SCALE)
        if PROBE:
            _probe_program(table, row, start, n, probe_tau, probe_norms, inv_scale, weight_decay, 0.0, smoothing,
                           ema_weight, "lion", NCOL - 3, P, False, False, SIGN, MAXIMIZE, HAS_SCALE, NORMS,
                           ALIGNED, SOFT_BF16, BLOCK)
        elif start + BLOCK <= n:
            _lion_tile(table, row, start, n, diagnostics, inv_scale, lr, beta1, beta2, one_minus_beta1,
                       one_minus_beta2, weight_decay, smoothing, ema_weight, age_weight, hvp_scale, shrink,
                       correction_lr2, kappa_lr, False, P, S1, R, H, HAS_REF, UPDATE_REFS, HAS_ORIGIN, STORE_HVP,
                       REUSE_HVP, DIAG, MEMORYLESS, CORRECTION, SIGN, MAXIMIZE, HAS_SCALE, ALIGNED, SOFT_BF16, BLOCK)
        else:
            _lion_tile(table, row, start, n, diagnostics, inv_scale, lr, beta1, beta2, one_minus_beta1,
                       one_minus_beta2, weight_decay, smoothing, ema_weight, age_weight, hvp_scale, shrink,
                       correction_lr2, kappa_lr, True, P, S1, R, H, HAS_REF, UPDATE_REFS, HAS_ORIGIN, STORE_HVP,
                       REUSE_HVP, DIAG, MEMORYLESS, CORRECTION, SIGN, MAXIMIZE, HAS_SCALE, ALIGNED, SOFT_BF16, BLOCK)


# ------------------------------------------------------------------ sgd

@triton.jit
def _sgd_tile(table, row, start, n, diagnostics, inv_scale,
              lr, momentum, weight_decay, update_scale, memory_coef, hvp_scale, correction_lr2, kappa_lr,
              MASKED: tl.constexpr, P: tl.constexpr, S1: tl.constexpr, R: tl.constexpr, H: tl.constexpr,
              HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
              HAS_REF: tl.constexpr, UPDATE_REFS: tl.constexpr, HAS_ORIGIN: tl.constexpr,
              STORE_HVP: tl.constexpr, REUSE_HVP: tl.constexpr, DIAG: tl.constexpr,
              MEMORYLESS: tl.constexpr, CORRECTION: tl.constexpr, MAXIMIZE: tl.constexpr,
              HAS_SCALE: tl.constexpr, ALIGNED: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    mask = tl.arange(0, BLOCK) < n - start
    p_ptrs, p = _load_theta(table, row, 4, start, mask, P, MASKED, HAS_ORIGIN, ALIGNED, BLOCK)
    g_ptrs = _tile(table, row, 1, start, P, ALIGNED, BLOCK)
    g = _load_grad(g_ptrs, mask, inv_scale, MASKED, HAS_SCALE, MAXIMIZE)
    NEED_M: tl.constexpr = (HAS_REF or REUSE_HVP) and (CORRECTION or DIAG)
    if NEED_M or STORE_HVP:
        hvp = _hvp(table, row, 3, start, mask, g, inv_scale, hvp_scale, R, H, MASKED, HAS_SCALE, MAXIMIZE,
                   UPDATE_REFS, REUSE_HVP, STORE_HVP, ALIGNED, SOFT_BF16, BLOCK)

    g_raw = g
    g = g + _decay_term(weight_decay, p)
    if HAS_MOMENTUM:
        b_ptrs = _tile(table, row, 2, start, S1, ALIGNED, BLOCK)
        momentum_buffer = momentum * _load(b_ptrs, mask, MASKED) + g
        if NESTEROV:
            F = g + momentum * momentum_buffer
        else:
            F = momentum_buffer
    else:
        F = g
    u = update_scale * g
    M = tl.zeros_like(p)
    if NEED_M:
        hvp = hvp + weight_decay * g
        M = memory_coef * hvp
    if MEMORYLESS:
        p, limited = _descend(p, 1.0, lr, u, M, correction_lr2, u, kappa_lr, False, CORRECTION)
    else:
        p, limited = _descend(p, 1.0, lr, F, M, correction_lr2, F, kappa_lr, False, CORRECTION)
    if DIAG:
        _diagnostics(diagnostics, F, u, M, lr, 0.5 * g * g, 0.0, limited, mask, MASKED, False, CORRECTION)

    _store(p_ptrs, p, mask, P, MASKED, SOFT_BF16)
    if HAS_MOMENTUM:
        _store(b_ptrs, momentum_buffer, mask, S1, MASKED, SOFT_BF16)
    if HAS_REF and UPDATE_REFS:
        _store(_tile(table, row, 3, start, R, ALIGNED, BLOCK), g_raw, mask, R, MASKED, SOFT_BF16)


@triton.jit
def _sgd_direction(p, g, weight_decay):
    """reference.sgd_direction: g~, without the step's factor update_scale."""
    return g + _decay_term(weight_decay, p)


@triton.jit
def _sgd_step_scalars(step_scalars, correction64, correction_limit64):
    """STEP_SCALARS["sgd"] (lr, update_scale, memory_coef, hvp_scale) and the host's derived correction_lr2 and
    kappa_lr, as _triton_ops.sgd computes them, rounded to fp32."""
    lr, correction_lr2, kappa_lr = _shared_step_scalars(step_scalars, correction64, correction_limit64)
    return (lr.to(tl.float32), tl.load(step_scalars + 1).to(tl.float32), tl.load(step_scalars + 2).to(tl.float32),
            tl.load(step_scalars + 3).to(tl.float32), correction_lr2.to(tl.float32), kappa_lr.to(tl.float32))


@triton.jit
def sgd_kernel(table, blocks, diagnostics, grad_scale, found_inf, step_scalars, probe_tau, probe_norms,
               lr, momentum, weight_decay, update_scale, memory_coef, hvp_scale, correction_lr2, kappa_lr,
               correction64: tl.float64, correction_limit64: tl.float64,
               DEVICE_SCALARS: tl.constexpr, P: tl.constexpr, S1: tl.constexpr, R: tl.constexpr, H: tl.constexpr,
               HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               HAS_REF: tl.constexpr, UPDATE_REFS: tl.constexpr, HAS_ORIGIN: tl.constexpr,
               STORE_HVP: tl.constexpr, REUSE_HVP: tl.constexpr, PROBE: tl.constexpr, HAS_TAU: tl.constexpr,
               NORMS: tl.constexpr, DIAG: tl.constexpr,
               MEMORYLESS: tl.constexpr, CORRECTION: tl.constexpr, MAXIMIZE: tl.constexpr,
               HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, ALIGNED: tl.constexpr,
               SOFT_BF16: tl.constexpr, NCOL: tl.constexpr, BLOCK: tl.constexpr):
    row, start, go = _program(blocks, found_inf, HAS_INF)
    if go:
        if DEVICE_SCALARS:
            lr, update_scale, memory_coef, hvp_scale, correction_lr2, kappa_lr = _sgd_step_scalars(
                step_scalars, correction64, correction_limit64)
        if HAS_TAU and not PROBE:
            hvp_scale = _inverse_tau(probe_tau)
        row = row * NCOL
        n = tl.load(table + row + NCOL - 1)
        inv_scale = _inv_scale(grad_scale, HAS_SCALE)
        if PROBE:
            _probe_program(table, row, start, n, probe_tau, probe_norms, inv_scale, weight_decay, 0.0, 0.0, 0.0,
                           "sgd", NCOL - 3, P, False, False, False, MAXIMIZE, HAS_SCALE, NORMS, ALIGNED,
                           SOFT_BF16, BLOCK)
        elif start + BLOCK <= n:
            _sgd_tile(table, row, start, n, diagnostics, inv_scale, lr, momentum, weight_decay, update_scale,
                      memory_coef, hvp_scale, correction_lr2, kappa_lr, False, P, S1, R, H, HAS_MOMENTUM, NESTEROV,
                      HAS_REF, UPDATE_REFS, HAS_ORIGIN, STORE_HVP, REUSE_HVP, DIAG, MEMORYLESS, CORRECTION,
                      MAXIMIZE, HAS_SCALE, ALIGNED, SOFT_BF16, BLOCK)
        else:
            _sgd_tile(table, row, start, n, diagnostics, inv_scale, lr, momentum, weight_decay, update_scale,
                      memory_coef, hvp_scale, correction_lr2, kappa_lr, True, P, S1, R, H, HAS_MOMENTUM, NESTEROV,
                      HAS_REF, UPDATE_REFS, HAS_ORIGIN, STORE_HVP, REUSE_HVP, DIAG, MEMORYLESS, CORRECTION,
                      MAXIMIZE, HAS_SCALE, ALIGNED, SOFT_BF16, BLOCK)
