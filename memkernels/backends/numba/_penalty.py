"""AdamW's penalty sum for the numba kernels, without a log1p per element.

With eps outside the square root, an element's penalty is
|g| - eps log1p(|g| / eps), and its log1p costs as many instructions as the
rest of the diagnostics together. The kernels need only the sum, and a sum of
logs is the log of a product: with u = 1 + |g| / eps = 2**e m, m in
[sqrt(1/2), sqrt(2)) (from u's bits, as _log1p splits it),
sum log1p(|g| / eps) = ln 2 sum e + log prod m. Per element that is one
multiply-add for u, four integer operations and one multiply; per sub-block the
exponents are summed as integers and the m multiplied in the compute dtype
(256 factors stay within [2**-128, 2**128]); per chunk the sub-block products
are multiplied in float64 (frexp keeps them in range) and one log is taken at
the end. The kernel sums |g| as its penalty term; penalty = sum |g| - eps L.

Accuracy: log u is log1p(|g| / eps) up to u's rounding (2**-24 absolute in
float32) and the product's (2**-24 relative per factor), so the sum moves by
about eps 2**-23 per element: less than the reference's own rounding of each
term, |g| 2**-24, wherever |g| >= 2 eps, and where the penalty is a sum over
elements far below eps, those terms are cancellation noise in the reference
too.

Near sqrt(1/2) 256 factors make a subnormal product, which keeps 22 bits
(2**-22 in the log). A sub-block where some u is not a finite number (|g| / eps
overflows, a NaN or Inf gradient, a subnormal eps whose reciprocal is Inf), or
whose product rounded up to Inf (256 factors next to sqrt(2): 2**128 is
float32's limit), is summed again from its gradients (the kernel never writes
them) with the per-element formula and log1p, the sum in float64: NaN and Inf
come out as in the reference. The test needs no work per element: the terms
are >= 0, so the sub-block's sum of |g| bounds each of them.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.errors import TypingError
from numba.extending import intrinsic

from ._dtypes import load
from ._log1p import log1p
from .elements import load_grad

_jit = njit(error_model="numpy", forceinline=True)

# Per compute dtype: integer width, mantissa bits, exponent bias and the bits of sqrt(1/2).
_LAYOUT = {types.float32: (32, 23, 127, 0x3F3504F3), types.float64: (64, 52, 1023, 0x3FE6A09E667F3BCD)}
_LN2 = math.log(2.0)
_LOW, _HIGH = 2.0 ** -512, 2.0 ** 512


@intrinsic
def _split(typingctx, u):
    """(m, e + bias) with u = 2**e m, m in [sqrt(1/2), sqrt(2)), for a finite u >= 1.

    Integer operations of u's own width: numba would widen int32 arithmetic to 64 bits,
    which halves the SIMD lanes.
    """
    if u not in _LAYOUT:
        raise TypingError(f"_split expects float32 or float64, got {u}")
    width, mantissa, bias, sqrt_half = _LAYOUT[u]

    def codegen(context, builder, sig, args):
        word = ir.IntType(width)
        const = lambda v: ir.Constant(word, v)  # noqa: E731
        shifted = builder.add(builder.bitcast(args[0], word), const((bias << mantissa) - sqrt_half))
        m = builder.add(builder.and_(shifted, const((1 << mantissa) - 1)), const(sqrt_half))
        e = builder.lshr(shifted, const(mantissa))
        return context.make_tuple(builder, sig.return_type, (builder.bitcast(m, context.get_value_type(u)), e))

    return types.Tuple((u, types.int32 if width == 32 else types.int64))(u), codegen


@intrinsic
def _add(typingctx, a, b):
    """a + b in a's integer width (numba's + would widen int32)."""
    if not (isinstance(a, types.Integer) and a == b):
        raise TypingError(f"_add expects two integers of one type, got {a}, {b}")

    def codegen(context, builder, sig, args):
        return builder.add(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def no_exponents(typingctx, like):
    """An exponent sum of zero, in the integer type that _split gives for like's dtype."""
    if like not in _LAYOUT:
        raise TypingError(f"no_exponents expects float32 or float64, got {like}")
    width = _LAYOUT[like][0]

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(width), 0)

    return (types.int32 if width == 32 else types.int64)(like), codegen


@njit(error_model="numpy", forceinline=True, fastmath={"contract", "reassoc"})
def add_logs(exponents, product, abs_g, c):
    """Add u = 1 + |g| / eps to a sub-block's (exponent sum, mantissa product).

    reassoc lets LLVM vectorize the product; contract makes u one multiply-add.
    """
    m, e = _split(abs_g * c.inv_eps + c.one)
    return _add(exponents, e), product * m


@_jit
def sub_block(abs_sum, exponents, product, n, logs, g_, c):
    """This sub-block's part of the penalty sum, and the chunk's (exponent sum, float64 product) after it.

    abs_sum is the sub-block's sum of |g| (the kernel's float32 sum, widened: Inf if it overflowed,
    which sends the sub-block to the per-element sum); the chunk's penalty is the sum of the
    returned parts less eps times log_sum(logs).
    """
    if abs_sum * c.inv_eps <= c.penalty_limit and np.float64(product) < np.inf:
        bias = _split(c.one)[1]  # 1 = 2**0 * 1
        exponent, mantissa = logs[0] + (np.float64(exponents) - np.float64(bias) * n), logs[1] * np.float64(product)
        if not _LOW < mantissa < _HIGH:  # 256 factors move it by 2**128 at most: renormalize before float64 overflows
            mantissa, shift = math.frexp(mantissa)
            exponent += shift
        return abs_sum, (exponent, mantissa)
    total = 0.0
    for i in range(n):
        g = abs(load_grad(load(g_, i, c.zero), c.inv_scale, True))
        total += np.float64(g - c.eps * log1p(g * c.inv_eps))
    return total, logs


@_jit
def log_sum(logs):
    """ln 2 (exponent sum) + log(product): the sum of log1p(|g| / eps) over the chunk's fast sub-blocks."""
    return logs[0] * _LN2 + np.log(logs[1])
