"""Loads and stores that convert between a tensor's storage dtype and the compute dtype.

numba has no bfloat16 or float16 arrays, so half tensors reach the kernels as
16-bit integer views of their bits: bfloat16 as uint16, float16 as int16 (the
two integer types keep the two formats apart at compile time). The
conversions are written as LLVM instructions, which the loop vectorizer turns
into SIMD code:
- bfloat16 -> float32 is exact (the 16 bits are the top of a float32);
- float32 -> bfloat16 rounds to nearest even, and a NaN stays a NaN, as
  torch's copy_ does;
- float16 <-> float32 are LLVM's fpext / fptrunc (IEEE, round to nearest
  even, subnormals kept; F16C instructions on x86).
float32 / float64 arrays load into the compute dtype of the call and store
with numba's cast (round to nearest even).

view() makes such an array from a tensor's data address (torch's data_ptr()),
so that one kernel call reaches every tensor of an op call through a table of
addresses instead of one numpy array argument per tensor.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

_I16, _I32, _F32 = ir.IntType(16), ir.IntType(32), ir.FloatType()
_BF16_NAN = 0x7FC0  # what c10::BFloat16 makes of a NaN


def _check(value, expected, what: str) -> None:
    if value != expected:
        raise TypingError(f"{what} expects {expected}, got {value}")


@intrinsic
def _bf16_to_f32(typingctx, bits):
    _check(bits, types.uint16, "bfloat16 bits")

    def codegen(context, builder, sig, args):
        wide = builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16))
        return builder.bitcast(wide, _F32)

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_bf16(typingctx, value):
    _check(value, types.float32, "bfloat16 rounding")

    def codegen(context, builder, sig, args):
        x = args[0]
        word = builder.bitcast(x, _I32)
        lsb = builder.and_(builder.lshr(word, ir.Constant(_I32, 16)), ir.Constant(_I32, 1))
        bias = builder.add(lsb, ir.Constant(_I32, 0x7FFF))  # ties go to the even neighbour
        rounded = builder.trunc(builder.lshr(builder.add(word, bias), ir.Constant(_I32, 16)), _I16)
        is_nan = builder.fcmp_unordered("uno", x, x)
        return builder.select(is_nan, ir.Constant(_I16, _BF16_NAN), rounded)

    return types.uint16(types.float32), codegen


@intrinsic
def _f16_to_f32(typingctx, bits):
    _check(bits, types.int16, "float16 bits")

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)

    return types.float32(types.int16), codegen


@intrinsic
def _f32_to_f16(typingctx, value):
    _check(value, types.float32, "float16 rounding")

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

    return types.int16(types.float32), codegen


@intrinsic
def _pointer(typingctx, address, start, like):
    """The address of element `start` of an array of like's dtype that begins at the integer `address`."""
    if not (isinstance(address, types.Integer) and isinstance(start, types.Integer) and isinstance(like, types.Array)):
        raise TypingError(f"_pointer expects an integer address and start and an array, got {address}, {start}, {like}")

    def codegen(context, builder, sig, args):
        base = builder.inttoptr(args[0], context.get_data_type(like.dtype).as_pointer())
        return builder.gep(base, [context.cast(builder, args[1], start, types.intp)], inbounds=True)

    return types.CPointer(like.dtype)(address, start, like), codegen


@njit(forceinline=True)
def view(address, start, count, like):
    """Elements start .. start + count of the array of like's dtype at `address`, as a 1-D array.

    The memory belongs to a torch tensor that outlives the kernel call; the view does not own it.
    """
    return carray(_pointer(address, start, like), count)


def load(a, i, like):
    """a[i] in the compute dtype of `like` (a scalar of the call's compute dtype)."""


def store(a, i, value):
    """a[i] = value, rounded to a's storage dtype."""


@overload(load)
def _load(a, i, like):
    if a.dtype == types.uint16:
        return lambda a, i, like: _bf16_to_f32(a[i])
    if a.dtype == types.int16:
        return lambda a, i, like: _f16_to_f32(a[i])
    return lambda a, i, like: cast_like(a[i], like)


@overload(store)
def _store(a, i, value):
    if a.dtype == types.uint16:
        def store_bf16(a, i, value):
            a[i] = _f32_to_bf16(value)
        return store_bf16
    if a.dtype == types.int16:
        def store_f16(a, i, value):
            a[i] = _f32_to_f16(value)
        return store_f16

    def store_float(a, i, value):
        a[i] = value
    return store_float


def cast_like(value, like):
    """value converted to the dtype of the scalar `like`."""


@overload(cast_like)
def _cast_like(value, like):
    if like == types.float32:
        return lambda value, like: np.float32(value)
    return lambda value, like: np.float64(value)
