"""The numba kernels: one parallel pass over every tensor of an op call and their states.

One driver, step_kernel, serves every op: it makes one kernel per op and
combination of flags. The op's element functions (elements.ELEMENTS) and the
flags are closure constants, which numba freezes, so each kernel contains only
the code of its op and mode (the fast path reads no grad_refs and sums no
diagnostics). Kernels are cached on disk (_cache.py), so a second process loads them
instead of compiling, under their factory's name and flags and SOURCES, a digest
of this file and the modules it inlines: an edit anywhere recompiles instead of
loading stale code. The element functions are not cached on their own: a cached
kernel holds their code.

A kernel reaches the tensors through `addresses`, one row per tensor with the
data address of that tensor in each list (params, grads, the states,
grad_refs, origins, hvps; 0 for an absent list), and runs one prange over
`work`, rows of (tensor, first element, element count) that cut every tensor
into chunks of at most CHUNK elements: one call and one fork/join of the thread
pool per op call, however many tensors, and small tensors share the threads. The arrays after
`work` are empty and only carry each list's dtype (see _dtypes.view). A stochastic step (the
`stochastic` flag) also reads `keys`, one row per tensor with a key per pair of the lists it writes (the
states, grad_refs, hvps, params: _ops.KEY_COLUMNS), once per chunk, and stores every bfloat16 element by
_rounding.round_bf16 of its write's bits (ops/rounding.py, key_of_write) at its index in the tensor
(start + i, of which the hash mixes the low word, counted in its own 32-bit variable: from start + i, LLVM
built a vector of 64-bit indices and narrowed it, 7 of the 67 instructions of a 16-element iteration of
stochastic bf16-state AdamW); without the flag `keys` is empty and never read, and the stores round to
nearest even.
Bfloat16 params are written compensated (`kahan`: elements.kahan, the compensations in the last column of
addresses, of the params' dtype) or stochastically by the params' write (`stochastic_params`); both flags
off, the store of before.
The inner loop runs over a chunk's views from index 0, which LLVM vectorizes (a
loop from lo to hi does not: numba's negative-index handling hides that the
index is non-negative), and the element math is force-inlined into it (a call
in the loop would stop vectorization).

Diagnostics: the terms of each SUB_BLOCK elements are summed in the compute
dtype (float32 adds are a quarter of the vector work of converting every term
to float64 and adding there), one multiply-add per term: the squares of F, lr M,
the memory and the residual from values the element math scaled by 2**-4, the
penalty, sign flips and limited elements times 2**-8, so every partial is
scaled by 1/SUB_BLOCK (exact: powers of two) and none can overflow where the
reference's float64 sum stays finite. The partials are added, unscaled, into
float64 totals per chunk, one row of `sums` per chunk, and the host adds the
rows in work order: the totals do not depend on the number of threads, and two
runs give the same bits. The counts (flips, limited elements) are exact: a
partial holds k 2**-8 with k <= 256. Every term is >= 0 (squares, penalties,
counts), so a float32 partial of
n terms is within (n - 1) 2**-24 relative of their exact sum (1.5e-5 for
n = 256 at worst; rounding errors of random sign make it ~1e-7 in practice,
and the float64 total averages the partials' errors); the reference sums
float32 terms in float64. A scaled value below 2**-126 is subnormal and may
lose bits: it changes a sum only where the whole slot is that small. Inf and
NaN terms propagate as in the reference (+Inf stays +Inf, NaN stays NaN).
Decoupled AdamW's penalty with eps outside the square root is summed as a log
of products (_penalty.py); its term is |g|, summed unscaled: a sub-block
whose float32 sum of |g| overflows is summed again per element in float64 there.

The probe pass (probe_kernel) writes theta + tau d and keeps theta: it sums its
two norms' float32 terms straight into float64, per chunk (two terms an element,
in a memory-bound pass, and no float32 partial to overflow).

Streaming stores (_dtypes.stream) write the two outputs that a pass only
writes, in calls large enough for them (host.py says when): origins in the
probe pass, and params in a step that reads theta from origins (stream_params:
the loop stores p into scratch() per block of SCRATCH elements, copied out
after it). Each chunk ends with fence(). Neither changes a value written, but
the probe norms' last bits (see probe_kernel).
"""
from __future__ import annotations

import functools
import hashlib
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ...ops import SPECS
from . import _dtypes, _log1p, _penalty, _rounding, elements
from ._cache import cached
from ._dtypes import SCRATCH, cast_like, fence, load, loads, scratch, store, stores, stream, view, views
from ._fork import threads_usable
from .elements import ELEMENTS

SOURCES = hashlib.sha256(b"".join(Path(module.__file__).read_bytes() for module in (
    sys.modules[__name__], elements, _dtypes, _log1p, _penalty, _rounding))).hexdigest()

CHUNK = 1 << 14  # 64 KiB of fp32 per array: a few arrays of a chunk fit in L2
SUB_BLOCK = 256  # elements per partial sum of the diagnostics
_SCALE, _UNSCALE = 1.0 / SUB_BLOCK, float(SUB_BLOCK)


_PREFER_256_BIT = '"prefer-vector-width"="256"'


class _FunctionAttributes(ir.FunctionAttributes):
    _known = ir.FunctionAttributes._known | {_PREFER_256_BIT}


@intrinsic
def prefer_256_bit_vectors(typingctx):
    """Have LLVM vectorize the calling function with 256-bit registers (its prefer-vector-width).

    For SGD's loop, two multiply-adds per element between its loads and stores: built with 512-bit
    vectors it ran 2-7% behind torch's fused SGD (an AVX2 kernel) at 64M parameters on Zen 4, the
    most when memory was fastest; built at 256 bits it runs at parity (kernels alone, same buffers).
    Zen 4 splits a 512-bit operation in two, so arithmetic throughput is unchanged, and AVX-512VL
    keeps its 32 registers at 256 bits. The AdamW and Lion loops gained nothing (AdamW with
    diagnostics, bound by its multiplies and divisions, lost 1-8%), so they keep LLVM's choice.
    llvmlite accepts only the enum attributes it knows by name, so the function's attribute set
    gets a class that knows this string attribute; an llvmlite where that fails builds the kernel at
    LLVM's default width and says so in a warning.
    """
    def codegen(context, builder, sig, args):
        attributes = builder.function.attributes
        try:
            attributes.__class__ = _FunctionAttributes
            attributes.add(_PREFER_256_BIT)
        except (AttributeError, TypeError, ValueError) as exc:
            warnings.warn(f"memkernels: this llvmlite took no vector-width hint ({exc!r}); the numba SGD kernel "
                          "is built with LLVM's default vectors, 2-7% slower on Zen 4", RuntimeWarning, stacklevel=1)
        return context.get_dummy_value()

    return types.none(), codegen


@njit(error_model="numpy", forceinline=True)
def load_hvp(r_, h_, i, g, c, has_ref, processed, reuse_hvp):
    """hvp: kept in hvps (reuse_hvp), else estimated from g_ref (has_ref), else unused (zero).

    g_ref is multiplied by ref_inv_scale unless processed (a constant): refs this kernel stores hold
    processed g already (ref_inv_scale is 1), and refs it only reads share g's factor, 1 when not scaled.
    """
    if reuse_hvp:
        return load(h_, i, c.zero)
    if not has_ref:
        return c.zero
    g_ref = load(r_, i, c.zero)
    g_ref = g_ref if processed else elements.load_grad(g_ref, c.ref_inv_scale, True)
    return elements.estimate_hvp(g_ref, g, c.hvp_scale)


@njit(fastmath={"reassoc", "contract"}, error_model="numpy", forceinline=True)
def add(partial, terms, scale, flips, raw_penalty, limits):
    """partial + each term's part, one multiply-add each: squares of the first four, the rest times scale.

    The flags only let LLVM vectorize the sums (reassoc) and fuse each multiply into its add
    (contract). flips and limits (constants) leave out the sign flips of AdamW and SGD, which have
    none, and the limited elements of a step without correction; raw_penalty (a constant) adds the
    penalty term unscaled (decoupled AdamW's |g|, see the module docstring), one multiply fewer in a
    loop bound by its multiplies.
    """
    return (partial[0] + terms[0] * terms[0], partial[1] + terms[1] * terms[1], partial[2] + terms[2] * terms[2],
            partial[3] + terms[3] * terms[3], partial[4] + terms[4] if raw_penalty else partial[4] + terms[4] * scale,
            partial[5] + terms[5] * scale if flips else partial[5],
            partial[6] + terms[6] * scale if limits else partial[6])


@njit(error_model="numpy", forceinline=True)
def unscaled(partial, unscale):
    """partial * unscale in float64 (exact scaling: the partial is widened first)."""
    return (np.float64(partial[0]) * unscale, np.float64(partial[1]) * unscale, np.float64(partial[2]) * unscale,
            np.float64(partial[3]) * unscale, np.float64(partial[4]) * unscale, np.float64(partial[5]) * unscale,
            np.float64(partial[6]) * unscale)


@njit(error_model="numpy", forceinline=True)
def accumulate(totals, block):
    return (totals[0] + block[0], totals[1] + block[1], totals[2] + block[2], totals[3] + block[3],
            totals[4] + block[4], totals[5] + block[5], totals[6] + block[6])


@njit(error_model="numpy", forceinline=True)
def zeros_like(x):
    return (x, x, x, x, x, x, x)


@njit(fastmath={"reassoc"}, error_model="numpy", forceinline=True)
def add_norms(norms, theta_sq, d_sq):
    """norms + the float64 values of theta^2 and d^2 (reassoc lets LLVM vectorize the sums)."""
    return norms[0] + np.float64(theta_sq), norms[1] + np.float64(d_sq)


def kernels(*, parallel: bool):
    """A kernel factory's decorator: one kernel per arguments (made once), compiled with numba (in parallel
    unless a forked child cannot start threads: _fork.py) and kept in the disk cache under the
    factory's name and arguments, with SOURCES (_cache.py)."""
    def decorate(factory: Callable) -> Callable:
        @functools.cache
        def variant(*args, threads: bool):
            return cached(njit(parallel=threads, error_model="numpy")(factory(*args)),
                          f"{factory.__name__}{args + (threads,)}", SOURCES)

        @functools.wraps(factory)
        def make(*args):
            return variant(*args, threads=parallel and threads_usable())
        return make
    return decorate


_ZEROS = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@kernels(parallel=True)
def step_kernel(op: str, flags: tuple[bool, ...], correct: bool, has_origin: bool, has_ref: bool, write_ref: bool,
                reuse_hvp: bool, store_hvp: bool, diagnose: bool, scaled: bool, stream_params: bool, stochastic: bool,
                kahan: bool = False, stochastic_params: bool = False):
    """The step of op (its elements.ELEMENTS entry, which takes `flags`) on every tensor of the call.

    The kernel takes the op's states as a tuple of dtype carriers, one per state of the op's spec in its
    order (None for an absent one: SGD's buffer without momentum), and reaches them through columns 2, 3, ...
    of addresses.
    """
    element = ELEMENTS[op]
    n_states = len(SPECS[op].states)
    refs = 2 + n_states  # addresses' columns: params, grads, the states, grad_refs, origins, hvps[, compensations]
    # One tuple constant, not *flags: its items keep their constant types (a star call passes plain bools), so
    # numba compiles the step for these flags and drops their dead branches before LLVM sees them.
    step, step_flags = element.step, (*flags, correct, has_ref or reuse_hvp)
    flips, narrow_vectors, states_first = element.sign_flips, element.narrow_vectors, element.states_first
    log_penalty = diagnose and element.log_penalty(*flags)  # the penalty term is |g| (_penalty.py)
    block = SUB_BLOCK if diagnose else SCRATCH if stream_params else CHUNK
    # the writes (ops/rounding.py, key_of_write): the states, then grad_refs, hvps and params
    state_keys, other_keys = _rounding.chunk_keys(0, n_states), _rounding.chunk_keys(n_states, 3)
    state_shifts, (ref_shift, hvp_shift, p_shift) = _rounding.shifts(0, n_states), _rounding.shifts(n_states, 3)

    def kernel(addresses, keys, work, params, grads, states, grad_refs, origins, hvps, sums, c):
        scale = cast_like(_SCALE, c.zero)
        for chunk in prange(work.shape[0]):
            if narrow_vectors:
                prefer_256_bit_vectors()  # here: numba outlines the prange body into the function LLVM vectorizes
            row, lo, count = work[chunk, 0], work[chunk, 1], work[chunk, 2]
            if stochastic:  # the keys of the states, grad_refs, hvps and params in this chunk (_rounding.chunk_keys)
                s_keys = state_keys(keys, row, lo)
                ref_key, hvp_key, p_key = other_keys(keys, row, lo)
            totals = _ZEROS
            logs = (0.0, 1.0)  # the chunk's exponent sum and float64 mantissa product
            for start in range(lo, lo + count, block):
                n = min(block, lo + count - start)
                p_ = view(addresses[row, 0], start, n, params)
                g_ = view(addresses[row, 1], start, n, grads)
                s_ = views(addresses, row, 2, start, n, states)
                r_ = view(addresses[row, refs], start, n, grad_refs)
                h_ = view(addresses[row, refs + 2], start, n, hvps)
                theta_ = view(addresses[row, refs + 1], start, n, origins) if has_origin else p_
                out_ = scratch(n, params) if stream_params else p_
                c_ = view(addresses[row, refs + 3], start, n, params) if kahan else p_
                partial = zeros_like(c.zero)
                exponents, product = _penalty.no_exponents(c.zero), c.one
                low = _rounding.low_word(start)  # the low word of the element's index, start + i
                for i in range(n):
                    g = elements.load_grad(load(g_, i, c.zero), c.inv_scale, scaled)
                    hvp = load_hvp(r_, h_, i, g, c, has_ref, write_ref or not scaled, reuse_hvp)
                    if store_hvp and stochastic:
                        _rounding.store_rounded(h_, i, hvp, hvp_key, hvp_shift, low)
                    elif store_hvp:
                        store(h_, i, hvp)
                    if states_first:
                        states_in = loads(s_, i, c.zero)
                        theta = load(theta_, i, c.zero)
                    else:
                        theta = load(theta_, i, c.zero)
                        states_in = loads(s_, i, c.zero)
                    p, new_states, g_raw, diag = step(theta, g, states_in, hvp, c, step_flags)
                    if kahan:
                        p, compensation = elements.kahan(theta, p, load(c_, i, c.zero))
                        store(c_, i, compensation)
                        store(out_, i, p)
                    elif stochastic_params:
                        _rounding.store_rounded(out_, i, p, p_key, p_shift, low)
                    else:
                        store(out_, i, p)
                    if stochastic:
                        _rounding.stores_rounded(s_, i, new_states, s_keys, state_shifts, low)
                    else:
                        stores(s_, i, new_states)
                    if write_ref and stochastic:
                        _rounding.store_rounded(r_, i, g_raw, ref_key, ref_shift, low)
                    elif write_ref:
                        store(r_, i, g_raw)
                    if diagnose:
                        partial = add(partial, diag, scale, flips, log_penalty, correct)
                    if log_penalty:
                        exponents, product = _penalty.add_logs(exponents, product, diag[4], c)
                    low = np.uint32(low + np.uint32(1))
                if stream_params:
                    stream(p_, out_, n)
                if diagnose:
                    sub = unscaled(partial, _UNSCALE)
                    if log_penalty:
                        penalty, logs = _penalty.sub_block(np.float64(partial[4]), exponents, product, n, logs,
                                                           g_, c)
                        sub = (sub[0], sub[1], sub[2], sub[3], penalty, sub[5], sub[6])
                    totals = accumulate(totals, sub)
            if log_penalty:
                totals = (totals[0], totals[1], totals[2], totals[3],
                          totals[4] - np.float64(c.eps) * _penalty.log_sum(logs), totals[5], totals[6])
            if stream_params:
                fence()
            if diagnose:
                for k in range(len(totals)):
                    sums[chunk, k] = totals[k]
    return kernel


@kernels(parallel=True)
def probe_kernel(op: str, flags: tuple[bool, ...], scaled: bool, measure: bool, stream_origins: bool):
    """The probe pass of op (reference.probe of the op's direction, which takes `flags`): origins keep theta,
    params get theta + tau d, and with measure each chunk's sums of theta^2 and d^2 go to its row of sums.

    With stream_origins the pass runs over blocks of SCRATCH elements, and each block's theta goes to origins
    by stream() before the block's loop reads it again from L1 (streaming the whole chunk first made the pass
    5-14% slower than plain stores). The norms' reassociated float64 sums then group their terms otherwise:
    they may differ from the plain pass's in the last bits.
    """
    direction = ELEMENTS[op].direction
    block = SCRATCH if stream_origins else CHUNK

    def probe(addresses, work, params, grads, origins, sums, c):
        for chunk in prange(work.shape[0]):
            row, lo, count = work[chunk, 0], work[chunk, 1], work[chunk, 2]
            norms = (0.0, 0.0)
            for start in range(lo, lo + count, block):
                n = min(block, lo + count - start)
                p_ = view(addresses[row, 0], start, n, params)
                g_ = view(addresses[row, 1], start, n, grads)
                o_ = view(addresses[row, 2], start, n, origins)
                if stream_origins:
                    stream(o_, p_, n)
                for i in range(n):
                    theta = load(p_, i, c.zero)
                    g = elements.load_grad(load(g_, i, c.zero), c.inv_scale, scaled)
                    d = direction(theta, g, c, *flags)
                    p, theta_sq, d_sq = elements.probe(theta, d, c.tau)
                    if not stream_origins:
                        o_[i] = p_[i]  # theta's bits, whatever the dtype
                    store(p_, i, p)
                    if measure:
                        norms = add_norms(norms, theta_sq, d_sq)
            if stream_origins:
                fence()
            if measure:
                sums[chunk, 0], sums[chunk, 1] = norms
    return probe


@kernels(parallel=False)
def add_one_kernel():
    """+1 on the scalar of like's dtype at each address (the optimizers' step counts)."""
    def add_one(addresses, like):
        for i in range(addresses.size):
            count = view(addresses[i], 0, 1, like)
            count[0] += 1
    return add_one
