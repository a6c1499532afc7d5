"""The Triton backend's one kernel: every op's step and probe pass over many tensors in one launch.

Each program updates one tile of BLOCK elements of one tensor. The launch reads
two int64 tables built by _table.py: a pointer table (one row per tensor: the
data address of each list's tensor, in the columns params, grads, the op's
states, grad_refs, origins, hvps, then its numel) and a block map (per program:
the table row and the first element of its tile). The addresses are cast to
typed pointers in the kernel; this works compiled and under TRITON_INTERPRET=1
on CPU tensors, where the interpreter dereferences the host addresses directly.

The op is chosen at compile time: STEP, DIRECTION and DERIVED are its functions
from elements.py, STATES the (column, dtype) of each of its states present in
the call (SGD's buffer is absent without momentum), FLAGS its constexpr flags.
This module does what every op shares: the table walk, loads and stores (each
result rounded once to its list's dtype), the HVP estimate and the kept ones,
origins, the probe pass, the per-step scalars read on the device, and the
reductions into the diagnostics and the probe norms.

Full tiles take an unmasked path (with a 16-byte alignment hint when every
tensor of the call is 16-byte aligned, so that loads and stores vectorize);
only the last tile of a tensor is masked. Every flag that is constant for a
call is a tl.constexpr, so a disabled feature costs nothing.

A launch is either a step or (PROBE) the probe pass of backends/reference.py,
which moves theta to theta + tau d and keeps theta in the origins, read back by
the step that follows (HAS_ORIGIN). tau arrives as a float64 tensor
(probe_tau): in a step it replaces hvp_scale by 1 / tau.

The scalars that change from step to step (memkernels.ops's step_scalars)
arrive either in `n`, derived on the host, or (DEVICE_SCALARS) in a float64
tensor that each program reads: the op's DERIVED then derives the rest itself,
in float64 and in the host's order. Both give the same bits; only the second
lets a captured CUDA graph or a compiled step change lr without the host.

A stochastic step (STOCHASTIC) rounds every bfloat16 write of a state, a
grad_ref and a kept estimate by _rounding.round_bf16 of its write's bits at
the element's index in its tensor (start + i), as numba does: the keys arrive
as an int64 tensor (rounding_keys: per tensor a key per two writes of the op's
states in spec order, grad_refs, hvps and params: _ops.KEY_COLUMNS), read like the
pointer table, so one compiled variant serves every key. Without it the keys are
never read and the stores are those of before.

Bfloat16 params are written by elements.kahan (KAHAN: the compensations in a
column after hvps) or stochastically under the params' key (STOCHASTIC_PARAMS);
with neither, the table and the store are those of before.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ...reference import DIAGNOSTICS
from . import _rounding, elements

_LIMITED = tl.constexpr(DIAGNOSTICS.index("limited"))  # the slot that counts where the limit acted


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
def _store(ptrs, x, mask, DT: tl.constexpr, MASKED: tl.constexpr, SOFT_BF16: tl.constexpr):
    if DT == tl.bfloat16 and SOFT_BF16:
        y = _rounding.round_nearest_bf16(x)
    else:
        y = x.to(DT)
    if MASKED:
        tl.store(ptrs, y, mask=mask)
    else:
        tl.store(ptrs, y)


@triton.jit
def _store_rounded(ptrs, x, mask, keys, WRITE: tl.constexpr, start, DT: tl.constexpr, MASKED: tl.constexpr,
                   SOFT_BF16: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    """_store of a state, grad_refs, hvps or params tile; in a stochastic step a bfloat16 one is rounded by
    round_bf16 of the bits of its write number WRITE (rounding.key_of_write: the low or high half of the hash
    under keys[WRITE // 2]), each element by its bits at its index in the tensor."""
    if STOCHASTIC and DT == tl.bfloat16:
        bits = _rounding.random_bits(tl.load(keys + WRITE // 2), start + tl.arange(0, BLOCK)) >> (16 * (WRITE % 2))
        y = _rounding.round_bf16(x, bits)
        if MASKED:
            tl.store(ptrs, y, mask=mask)
        else:
            tl.store(ptrs, y)
    else:
        _store(ptrs, x, mask, DT, MASKED, SOFT_BF16)


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
def _load_states(table, row, start, mask, STATES: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr,
                 BLOCK: tl.constexpr):
    """The pointers and values of the op's states present in the call, in its order."""
    ptrs = ()
    values = ()
    for k in tl.static_range(len(STATES)):
        tile = _tile(table, row, STATES[k][0], start, STATES[k][1], ALIGNED, BLOCK)
        ptrs = ptrs + (tile,)
        values = values + (_load(tile, mask, MASKED),)
    return ptrs, values


@triton.jit
def _hvp(table, row, r_col: tl.constexpr, start, mask, g, inv_scale, hvp_scale, keys, R: tl.constexpr,
         H: tl.constexpr, MASKED: tl.constexpr, HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
         UPDATE_REFS: tl.constexpr, REUSE_HVP: tl.constexpr, STORE_HVP: tl.constexpr, ALIGNED: tl.constexpr,
         SOFT_BF16: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    """H d as backends/reference.py gets it for the op math: a kept estimate (hvps, column r_col + 2), or the
    estimate from g_ref (grad_refs, column r_col), kept in hvps when STORE_HVP (its write number r_col - 1:
    see _step_tile)."""
    if REUSE_HVP:
        hvp = _load(_tile(table, row, r_col + 2, start, H, ALIGNED, BLOCK), mask, MASKED)
    else:
        r_ptrs = _tile(table, row, r_col, start, R, ALIGNED, BLOCK)
        g_ref = _load_ref(r_ptrs, mask, inv_scale, MASKED, HAS_SCALE, MAXIMIZE, UPDATE_REFS)
        hvp = elements.estimate_hvp(g_ref, g, hvp_scale)
        if STORE_HVP:
            _store_rounded(_tile(table, row, r_col + 2, start, H, ALIGNED, BLOCK), hvp, mask, keys, r_col - 1, start,
                           H, MASKED, SOFT_BF16, STOCHASTIC, BLOCK)
    return hvp


# ------------------------------------------------------------------ reductions

@triton.constexpr_function
def _is_tile(term) -> bool:
    """Whether a diagnostic term varies per element: an op without it returns the constant 0 (reference.py's
    zeros), which reaches the kernel as a scalar, and its slot is left as it is."""
    return isinstance(term, tl.tensor) and term.type.is_block()


@triton.jit
def _sum_into(out, slot: tl.constexpr, term, mask, MASKED: tl.constexpr):
    """Add this tile's float64 sum of one term to slot `slot` of out."""
    if MASKED:
        term = tl.where(mask, term, 0.0)
    tl.atomic_add(out + slot, tl.sum(term.to(tl.float64), axis=0), sem="relaxed")


@triton.jit
def _diagnostics(diagnostics, terms, mask, MASKED: tl.constexpr, CORRECTION: tl.constexpr):
    """The tile's diagnostic terms (reference.DIAGNOSTICS order) added to their slots; the limit's count only
    with a correction (without one the limit acts nowhere)."""
    for k in tl.static_range(len(terms)):
        if _is_tile(terms[k]) and (CORRECTION or k != _LIMITED):
            _sum_into(diagnostics, k, terms[k], mask, MASKED)


# ------------------------------------------------------------------ per program

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
def _inverse_tau(probe_tau):
    """The hvp_scale that probe_tau replaces in a step: 1 / tau in float64 (0 for tau = 0, the host's rule),
    rounded to fp32."""
    tau = tl.load(probe_tau)
    return tl.where(tau > 0.0, 1.0 / tau, 0.0).to(tl.float32)


@triton.jit
def _read_step_scalars(step_scalars, N: tl.constexpr):
    """The N float64 values of the step_scalars tensor, in memkernels.ops's step_scalars order."""
    values = ()
    for k in tl.static_range(N):
        values = values + (tl.load(step_scalars + k),)
    return values


# ------------------------------------------------------------------ the probe pass

@triton.jit
def _probe_tile(table, row, start, n_el, probe_norms, inv_scale, tau, s, n, DIRECTION: tl.constexpr,
                FLAGS: tl.constexpr, o_col: tl.constexpr, MASKED: tl.constexpr, P: tl.constexpr,
                MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, NORMS: tl.constexpr, ALIGNED: tl.constexpr,
                SOFT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """backends/reference.py's probe pass on one tile: theta kept in the origins (column o_col), theta + tau d
    into params, and the tile's float64 sums of theta^2 and d^2 added to probe_norms."""
    mask = tl.arange(0, BLOCK) < n_el - start
    p_ptrs = _tile(table, row, 0, start, P, ALIGNED, BLOCK)
    p = _load(p_ptrs, mask, MASKED)
    g = _load_grad(_tile(table, row, 1, start, P, ALIGNED, BLOCK), mask, inv_scale, MASKED, HAS_SCALE, MAXIMIZE)
    d = DIRECTION(p, g, s, n, FLAGS)
    moved, theta_sq, d_sq = elements.probe(p, d, tau)
    _store(_tile(table, row, o_col, start, P, ALIGNED, BLOCK), p, mask, P, MASKED, SOFT_BF16)
    _store(p_ptrs, moved, mask, P, MASKED, SOFT_BF16)
    if NORMS:
        _sum_into(probe_norms, 0, theta_sq, mask, MASKED)
        _sum_into(probe_norms, 1, d_sq, mask, MASKED)


# ------------------------------------------------------------------ the step

@triton.jit
def _step_tile(table, row, start, n_el, diagnostics, inv_scale, hvp_scale, keys, s, n, STEP: tl.constexpr,
               FLAGS: tl.constexpr, STATES: tl.constexpr, MASKED: tl.constexpr, P: tl.constexpr, R: tl.constexpr,
               H: tl.constexpr, HAS_REF: tl.constexpr, UPDATE_REFS: tl.constexpr, HAS_ORIGIN: tl.constexpr,
               STORE_HVP: tl.constexpr, REUSE_HVP: tl.constexpr, DIAG: tl.constexpr, MEMORYLESS: tl.constexpr,
               CORRECTION: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, ALIGNED: tl.constexpr,
               SOFT_BF16: tl.constexpr, STOCHASTIC: tl.constexpr, KAHAN: tl.constexpr, STOCHASTIC_PARAMS: tl.constexpr,
               NCOL: tl.constexpr, BLOCK: tl.constexpr):
    """backends/reference.py's step on one tile: theta (from the origins after a probe pass), g, the states
    and H d in, the op's STEP, its results out. keys: the tensor's row of rounding_keys (read if STOCHASTIC or
    STOCHASTIC_PARAMS)."""
    r_col: tl.constexpr = NCOL - 4 - KAHAN  # grad_refs, then origins, hvps, [compensations] and the numel
    # write numbers (rounding.key_of_write), n the op's states: a state's column - 2, grad_refs n = r_col - 2,
    # hvps n + 1 = r_col - 1, params n + 2 = r_col
    mask = tl.arange(0, BLOCK) < n_el - start
    p_ptrs = _tile(table, row, 0, start, P, ALIGNED, BLOCK)
    if HAS_ORIGIN:
        theta = _load(_tile(table, row, r_col + 1, start, P, ALIGNED, BLOCK), mask, MASKED)
    else:
        theta = _load(p_ptrs, mask, MASKED)
    g = _load_grad(_tile(table, row, 1, start, P, ALIGNED, BLOCK), mask, inv_scale, MASKED, HAS_SCALE, MAXIMIZE)
    state_ptrs, states = _load_states(table, row, start, mask, STATES, MASKED, ALIGNED, BLOCK)
    NEED_M: tl.constexpr = (HAS_REF or REUSE_HVP) and (CORRECTION or DIAG)
    hvp = None  # the reference's: no estimate, M = 0
    if NEED_M or STORE_HVP:
        estimate = _hvp(table, row, r_col, start, mask, g, inv_scale, hvp_scale, keys, R, H, MASKED, HAS_SCALE,
                        MAXIMIZE, UPDATE_REFS, REUSE_HVP, STORE_HVP, ALIGNED, SOFT_BF16, STOCHASTIC, BLOCK)
        if NEED_M:
            hvp = estimate

    p, states, g_ref, terms = STEP(theta, g, states, hvp, s, n, FLAGS, MEMORYLESS, CORRECTION)
    if DIAG:
        _diagnostics(diagnostics, terms, mask, MASKED, CORRECTION)

    if KAHAN:
        c_ptrs = _tile(table, row, r_col + 3, start, P, ALIGNED, BLOCK)
        q, compensation = elements.kahan(theta, p, _load(c_ptrs, mask, MASKED))
        _store(c_ptrs, compensation, mask, P, MASKED, SOFT_BF16)
        _store(p_ptrs, q, mask, P, MASKED, SOFT_BF16)
    elif STOCHASTIC_PARAMS:
        _store_rounded(p_ptrs, p, mask, keys, r_col, start, P, MASKED, SOFT_BF16, True, BLOCK)
    else:
        _store(p_ptrs, p, mask, P, MASKED, SOFT_BF16)
    for k in tl.static_range(len(STATES)):
        _store_rounded(state_ptrs[k], states[k], mask, keys, STATES[k][0] - 2, start, STATES[k][1], MASKED, SOFT_BF16,
                       STOCHASTIC, BLOCK)
    if HAS_REF and UPDATE_REFS:
        _store_rounded(_tile(table, row, r_col, start, R, ALIGNED, BLOCK), g_ref, mask, keys, r_col - 2, start, R,
                       MASKED, SOFT_BF16, STOCHASTIC, BLOCK)


@triton.jit
def multi_tensor_kernel(table, blocks, diagnostics, grad_scale, found_inf, step_scalars, probe_tau, probe_norms,
                        rounding_keys, s, n, weight_decay64: tl.float64, correction64: tl.float64,
                        correction_limit64: tl.float64,
                        STEP: tl.constexpr, DIRECTION: tl.constexpr, DERIVED: tl.constexpr, FLAGS: tl.constexpr,
                        STATES: tl.constexpr, NSTEP: tl.constexpr, DEVICE_SCALARS: tl.constexpr, P: tl.constexpr,
                        R: tl.constexpr, H: tl.constexpr, HAS_REF: tl.constexpr, UPDATE_REFS: tl.constexpr,
                        HAS_ORIGIN: tl.constexpr, STORE_HVP: tl.constexpr, REUSE_HVP: tl.constexpr,
                        PROBE: tl.constexpr, HAS_TAU: tl.constexpr, NORMS: tl.constexpr, DIAG: tl.constexpr,
                        MEMORYLESS: tl.constexpr, CORRECTION: tl.constexpr, MAXIMIZE: tl.constexpr,
                        HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, ALIGNED: tl.constexpr,
                        SOFT_BF16: tl.constexpr, STOCHASTIC: tl.constexpr, KAHAN: tl.constexpr,
                        STOCHASTIC_PARAMS: tl.constexpr, NCOL: tl.constexpr, BLOCK: tl.constexpr):
    """s, n: the op's static and per-step fp32 scalars (namedtuples, elements.py); the float64 ones are the static
    scalars DERIVED combines with the step scalars (weight_decay64 is 0 for an op without decay)."""
    row, start, go = _program(blocks, found_inf, HAS_INF)
    if go:
        if DEVICE_SCALARS:
            n = DERIVED(*_read_step_scalars(step_scalars, NSTEP), weight_decay64, correction64, correction_limit64,
                        FLAGS, MEMORYLESS)
        hvp_scale = n.hvp_scale
        if HAS_TAU and not PROBE:
            hvp_scale = _inverse_tau(probe_tau)
        keys = rounding_keys + row * ((NCOL - 2 - KAHAN) // 2)  # this tensor's row: _ops.KEY_COLUMNS, a key per two
        # of its NCOL - 3 - KAHAN writes
        row = row * NCOL
        n_el = tl.load(table + row + NCOL - 1)
        inv_scale = _inv_scale(grad_scale, HAS_SCALE)
        if PROBE:
            tau = tl.load(probe_tau).to(tl.float32)
            if start + BLOCK <= n_el:
                _probe_tile(table, row, start, n_el, probe_norms, inv_scale, tau, s, n, DIRECTION, FLAGS, NCOL - 3,
                            False, P, MAXIMIZE, HAS_SCALE, NORMS, ALIGNED, SOFT_BF16, BLOCK)
            else:
                _probe_tile(table, row, start, n_el, probe_norms, inv_scale, tau, s, n, DIRECTION, FLAGS, NCOL - 3,
                            True, P, MAXIMIZE, HAS_SCALE, NORMS, ALIGNED, SOFT_BF16, BLOCK)
        elif start + BLOCK <= n_el:
            _step_tile(table, row, start, n_el, diagnostics, inv_scale, hvp_scale, keys, s, n, STEP, FLAGS, STATES,
                       False, P, R, H, HAS_REF, UPDATE_REFS, HAS_ORIGIN, STORE_HVP, REUSE_HVP, DIAG, MEMORYLESS,
                       CORRECTION, MAXIMIZE, HAS_SCALE, ALIGNED, SOFT_BF16, STOCHASTIC, KAHAN, STOCHASTIC_PARAMS, NCOL,
                       BLOCK)
        else:
            _step_tile(table, row, start, n_el, diagnostics, inv_scale, hvp_scale, keys, s, n, STEP, FLAGS, STATES,
                       True, P, R, H, HAS_REF, UPDATE_REFS, HAS_ORIGIN, STORE_HVP, REUSE_HVP, DIAG, MEMORYLESS,
                       CORRECTION, MAXIMIZE, HAS_SCALE, ALIGNED, SOFT_BF16, STOCHASTIC, KAHAN, STOCHASTIC_PARAMS, NCOL,
                       BLOCK)
