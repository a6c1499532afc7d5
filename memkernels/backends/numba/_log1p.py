"""log1p for the numba kernels, in plain arithmetic so that the loop around it vectorizes.

A call to libm's log1p inside a loop keeps LLVM from vectorizing the loop (numba
has no vector math library here), and the AdamW penalty of the diagnostics
needs log1p per element. Only x >= 0 (and NaN, Inf) occurs: the argument is
|g| / eps. The result is within a few ulps (torch.log1p, from MKL, within
one); it only enters the diagnostics, which are compared to 1e-6.

Both dtypes write u = 1 + x = 2**e * m with m in [sqrt(1/2), sqrt(2)).
- float32, in float32 arithmetic and without a division (divisions are the
  dearest instructions of the AdamW kernel), with multiply-adds fused (FMA:
  fewer instructions, and no less accurate): u rounds, and its rounding error
  c = x - (u - 1) (exact for x < 2**24: u - 1 is exact there; beyond, c scaled
  by 2**-e < 2**-24 no longer matters), scaled by 2**-e, joins
  f = m - 1 + c 2**-e, so that 1 + x = 2**e (1 + f); e, m and 2**-e come from
  u's bits with integer operations only (adding sqrt(2)'s offset to the bits
  puts m in [sqrt(1/2), sqrt(2)) without a comparison); log(1 + f) =
  f - f^2/2 + f^3 P(f) with P a degree-7 fit (relative error 7e-9 on
  [sqrt(1/2) - 1, sqrt(2) - 1], fitted for this module); ln 2 in two parts.
  Within 2 ulps (tests/test_numba.py measures it).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

_INT = {types.float32: types.uint32, types.float64: types.uint64}


@intrinsic
def _as_uint(typingctx, value):
    """The IEEE bits of a float32 / float64."""
    if value not in _INT:
        raise TypingError(f"_as_uint expects float32 or float64, got {value}")

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(sig.return_type))

    return _INT[value](value), codegen


@intrinsic
def _as_float(typingctx, bits, like):
    """The float of like's dtype whose IEEE bits are the low bits of `bits` (numba widens uint32 math)."""
    if like not in _INT or not isinstance(bits, types.Integer):
        raise TypingError(f"_as_float expects an integer and a float32 / float64, got {bits}, {like}")

    def codegen(context, builder, sig, args):
        value = args[0]
        if bits.bitwidth > like.bitwidth:
            value = builder.trunc(value, ir.IntType(like.bitwidth))
        return builder.bitcast(value, context.get_value_type(like))

    return like(bits, like), codegen


class _Format(NamedTuple):
    """Constants of the exponent / mantissa split and the atanh series, in one dtype.

    OR-ing a small integer k into the bits of 2**mantissa_bits gives the float 2**mantissa_bits + k,
    so the exponent becomes a float without an int-to-float conversion.
    """

    mantissa: int  # mask of the mantissa bits
    one_bits: int  # the exponent bits of 1.0
    shift: int  # mantissa bits
    magic_bits: int  # the bits of 2**mantissa_bits
    offset: float  # 2**mantissa_bits + exponent bias
    sqrt2: float
    zero: float
    half: float
    one: float
    series: tuple  # 1/(2k+1), highest k first


def _format(dtype, uint, mantissa_bits: int, bias: int, terms: int) -> _Format:
    magic = 2.0 ** mantissa_bits
    return _Format(uint((1 << mantissa_bits) - 1), uint(bias << mantissa_bits), uint(mantissa_bits),
                   np.array(magic, dtype).view(uint)[()], dtype(magic + bias), dtype(np.sqrt(2.0)),
                   dtype(0.0), dtype(0.5), dtype(1.0), tuple(dtype(1.0 / k) for k in range(2 * terms - 1, 0, -2)))


_I32 = ir.IntType(32)
_SQRT_HALF_BITS = 0x3F3504F3  # float32 sqrt(1/2)
_ONE_BITS = 0x3F800000


@intrinsic
def _split_f32(typingctx, u):
    """(m, e, 2**-e) with u = 2**e * m, m in [sqrt(1/2), sqrt(2)), for float32 u >= 1 (finite).

    2**-e is 0 where it would be subnormal (e >= 127). Written in 32-bit LLVM integer
    operations: numba would widen uint32 arithmetic to 64 bits, which halves the SIMD lanes.
    """
    if u != types.float32:
        raise TypingError(f"_split_f32 expects float32, got {u}")

    def codegen(context, builder, sig, args):
        const = lambda v: ir.Constant(_I32, v)  # noqa: E731
        shifted = builder.add(builder.bitcast(args[0], _I32), const(_ONE_BITS - _SQRT_HALF_BITS))
        biased = builder.lshr(shifted, const(23))  # e + 127
        m = builder.bitcast(builder.add(builder.and_(shifted, const(0x7FFFFF)), const(_SQRT_HALF_BITS)), ir.FloatType())
        e = builder.sitofp(builder.sub(biased, const(127)), ir.FloatType())
        inverse = builder.sub(const(254), biased)  # biased exponent of 2**-e
        inverse = builder.select(builder.icmp_signed(">", inverse, const(0)), inverse, const(0))
        scale = builder.bitcast(builder.shl(inverse, const(23)), ir.FloatType())
        return context.make_tuple(builder, sig.return_type, (m, e, scale))

    return types.UniTuple(types.float32, 3)(u), codegen


# P(f) of log(1 + f) = f - f^2/2 + f^3 P(f), highest power first (least squares / Lawson fit in float64).
_P32 = tuple(np.float32(c) for c in (-0.07375141978263855, 0.12626509368419647, -0.13200131058692932,
                                      0.1422600895166397, -0.1662147343158722, 0.1999988704919815,
                                      -0.2500084936618805, 0.3333335220813751))
_F64 = _format(np.float64, np.uint64, 52, 1023, 12)
_LN2_HI = np.float32(0.693145751953125)  # 12 significant bits: e * _LN2_HI is exact
_LN2_LO = np.float32(np.log(2.0) - 0.693145751953125)
_LN2 = np.log(2.0)
_HALF32 = np.float32(0.5)


@njit(error_model="numpy", forceinline=True)
def _log(u, f):
    """(log m, e) for u = 2**e * m with m in [sqrt(1/2), sqrt(2)), in u's dtype; f: its _Format."""
    bits = _as_uint(u)
    m = _as_float((bits & f.mantissa) | f.one_bits, u)
    e = _as_float((bits >> f.shift) | f.magic_bits, u) - f.offset
    if m > f.sqrt2:
        m = m * f.half
        e = e + f.one
    t = (m - f.one) / (m + f.one)
    t2 = t * t
    acc = f.zero
    for coef in f.series:
        acc = acc * t2 + coef
    return (t + t) * acc, e


def log1p(x):
    """log(1 + x) for x >= 0, NaN or Inf, in x's dtype."""


@njit(error_model="numpy", forceinline=True, fastmath={"contract"})
def _log1p_f32(x):
    one = np.float32(1.0)
    u = x + one
    c = x - (u - one)  # u + c == 1 + x
    m, e, scale = _split_f32(u)
    f = (m - one) + c * scale
    f2 = f * f
    f4 = f2 * f2  # Estrin's scheme: a short dependency chain, so the loop overlaps elements
    poly = (((_P32[0] * f + _P32[1]) * f2 + (_P32[2] * f + _P32[3])) * f4
            + ((_P32[4] * f + _P32[5]) * f2 + (_P32[6] * f + _P32[7])))
    log_m = f + f2 * (f * poly - _HALF32)
    result = e * _LN2_HI + (e * _LN2_LO + log_m)
    return result if x < np.inf else x  # Inf and NaN are their own log1p



@overload(log1p, jit_options={"error_model": "numpy", "forceinline": True})
def _log1p(x):
    if x == types.float32:
        return lambda x: _log1p_f32(x)
    if x == types.float64:
        def log1p_f64(x):
            u = 1.0 + x
            if u == 1.0 or not u < np.inf:  # tiny x, Inf and NaN are their own log1p
                return x
            log_m, e = _log(u, _F64)
            return (e * _LN2 + log_m) * (x / (u - 1.0))
        return log1p_f64
    raise TypingError(f"log1p: float32 or float64 expected, got {x}")
