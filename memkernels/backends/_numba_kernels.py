"""The numba kernels: one parallel pass over one flat tensor and its states.

A factory per op makes one kernel per combination of flags; the flags are
closure constants, which numba freezes, so each kernel contains only the code
its mode needs (the fast path reads no grad_refs and sums no diagnostics).
Kernels are cached on disk, so a second process loads them instead of
compiling. numba checks a cached kernel against this file's timestamp only, not
against the modules it inlines; every kernel therefore refers to SOURCES, a
digest of those modules, which makes it part of the closure values that numba
puts in the cache key: an edit anywhere recompiles instead of loading stale code.

The flat range is split into chunks of CHUNK elements, one prange iteration
each. The inner loop runs over slices of the chunk from index 0, which LLVM
vectorizes (a loop from lo to hi does not: numba's negative-index handling
hides that the index is non-negative), and the element math is force-inlined
into it (a call in the loop would stop vectorization). A chunk's diagnostic terms are summed in float64 into its own row of
`sums`, and the host adds the rows in chunk order: the totals do not depend on
the number of threads, and two runs give the same bits. Arrays a mode does not
use arrive empty (they are never indexed).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
from numba import njit, prange

from . import _numba_dtypes, _numba_log1p
from . import _numba_math as element
from ._numba_dtypes import load, store

SOURCES = hashlib.sha256(b"".join(Path(module.__file__).read_bytes()
                                  for module in (element, _numba_dtypes, _numba_log1p))).hexdigest()

CHUNK = 1 << 14  # 64 KiB of fp32 per array: a few arrays of a chunk fit in L2


def chunk_count(n: int) -> int:
    return (n + CHUNK - 1) // CHUNK


@njit(fastmath={"reassoc"}, error_model="numpy", forceinline=True, cache=True)
def accumulate(totals, terms):
    """totals + terms in float64. reassoc on these adds only lets LLVM vectorize the sums."""
    return (totals[0] + np.float64(terms[0]), totals[1] + np.float64(terms[1]),
            totals[2] + np.float64(terms[2]), totals[3] + np.float64(terms[3]),
            totals[4] + np.float64(terms[4]), totals[5] + np.float64(terms[5]))


_kernel = njit(parallel=True, error_model="numpy", cache=True)
_ZEROS = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@functools.cache
def adamw_kernel(decoupled: bool, eps_inside_sqrt: bool, memoryless: bool, correct: bool,
                 has_ref: bool, write_ref: bool, diagnose: bool, sources: str = SOURCES):
    @_kernel
    def adamw(params, grads, exp_avgs, exp_avg_sqs, grad_refs, sums, c):
        sources  # noqa: B018 (a closure value, hence part of the cache key)
        n = params.size
        for chunk in prange((n + CHUNK - 1) // CHUNK):
            lo = chunk * CHUNK
            hi = min(lo + CHUNK, n)
            p_, g_, m_, v_, r_ = params[lo:hi], grads[lo:hi], exp_avgs[lo:hi], exp_avg_sqs[lo:hi], grad_refs[lo:hi]
            totals = _ZEROS
            for i in range(hi - lo):
                g = element.load_grad(load(g_, i, c.zero), c.inv_scale)
                g_ref = element.load_grad(load(r_, i, c.zero), c.ref_inv_scale) if has_ref else c.zero
                p, exp_avg, exp_avg_sq, g_raw, diag = element.adamw(
                    load(p_, i, c.zero), g, load(m_, i, c.zero), load(v_, i, c.zero), g_ref, c,
                    decoupled, eps_inside_sqrt, memoryless, correct, has_ref)
                store(p_, i, p)
                store(m_, i, exp_avg)
                store(v_, i, exp_avg_sq)
                if write_ref:
                    store(r_, i, g_raw)
                if diagnose:
                    totals = accumulate(totals, diag)
            if diagnose:
                for k in range(len(totals)):
                    sums[chunk, k] = totals[k]
    return adamw


@functools.cache
def lion_kernel(smooth: bool, memoryless: bool, correct: bool, has_ref: bool, write_ref: bool, diagnose: bool,
                sources: str = SOURCES):
    @_kernel
    def lion(params, grads, exp_avgs, grad_refs, sums, c):
        sources  # noqa: B018 (a closure value, hence part of the cache key)
        n = params.size
        for chunk in prange((n + CHUNK - 1) // CHUNK):
            lo = chunk * CHUNK
            hi = min(lo + CHUNK, n)
            p_, g_, m_, r_ = params[lo:hi], grads[lo:hi], exp_avgs[lo:hi], grad_refs[lo:hi]
            totals = _ZEROS
            for i in range(hi - lo):
                g = element.load_grad(load(g_, i, c.zero), c.inv_scale)
                g_ref = element.load_grad(load(r_, i, c.zero), c.ref_inv_scale) if has_ref else c.zero
                p, exp_avg, g_out, diag = element.lion(load(p_, i, c.zero), g, load(m_, i, c.zero), g_ref, c,
                                                       smooth, memoryless, correct, has_ref)
                store(p_, i, p)
                store(m_, i, exp_avg)
                if write_ref:
                    store(r_, i, g_out)
                if diagnose:
                    totals = accumulate(totals, diag)
            if diagnose:
                for k in range(len(totals)):
                    sums[chunk, k] = totals[k]
    return lion


@functools.cache
def sgd_kernel(has_momentum: bool, nesterov: bool, memoryless: bool, correct: bool, has_ref: bool,
               write_ref: bool, diagnose: bool, sources: str = SOURCES):
    @_kernel
    def sgd(params, grads, momentum_buffers, grad_refs, sums, c):
        sources  # noqa: B018 (a closure value, hence part of the cache key)
        n = params.size
        for chunk in prange((n + CHUNK - 1) // CHUNK):
            lo = chunk * CHUNK
            hi = min(lo + CHUNK, n)
            p_, g_, b_, r_ = params[lo:hi], grads[lo:hi], momentum_buffers[lo:hi], grad_refs[lo:hi]
            totals = _ZEROS
            for i in range(hi - lo):
                g = element.load_grad(load(g_, i, c.zero), c.inv_scale)
                g_ref = element.load_grad(load(r_, i, c.zero), c.ref_inv_scale) if has_ref else c.zero
                buf = load(b_, i, c.zero) if has_momentum else c.zero
                p, buf, g_raw, diag = element.sgd(load(p_, i, c.zero), g, buf, g_ref, c,
                                                  has_momentum, nesterov, memoryless, correct, has_ref)
                store(p_, i, p)
                if has_momentum:
                    store(b_, i, buf)
                if write_ref:
                    store(r_, i, g_raw)
                if diagnose:
                    totals = accumulate(totals, diag)
            if diagnose:
                for k in range(len(totals)):
                    sums[chunk, k] = totals[k]
    return sgd
