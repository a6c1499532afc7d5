"""Stochastic rounding to bfloat16 for the Triton kernels: memkernels/ops/rounding.py per element, same bits.

On tl.uint32, whose multiplication wraps modulo 2**32 and whose right shifts are logical, compiled and under
TRITON_INTERPRET=1 alike. The bfloat16 result is made from its 16 bits by a bitcast, never by a float
conversion (the interpreter's truncates), so both give the reference's bits.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mix32(x):
    """rounding.mix32 on a tl.uint32 tensor."""
    x ^= x >> 16
    x *= tl.full((), 0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x *= tl.full((), 0x846CA68B, tl.uint32)
    x ^= x >> 16
    return x


@triton.jit
def random_bits(key, index):
    """rounding.random_bits: key an integer scalar holding the 32-bit key (int32 or int64, its low 32 bits
    are taken), index an int32 or int64 tensor of element indices >= 0; tl.uint32 bits."""
    k = key.to(tl.uint32)
    if index.dtype.primitive_bitwidth == 64:
        k ^= mix32((index >> 32).to(tl.uint32))
    return mix32(mix32(index.to(tl.uint32) + k) ^ k)


@triton.jit
def round_nearest_bf16(x):
    """fp32 -> bf16 rounded to nearest even in integer arithmetic (NaN stays NaN).

    The interpreter's own fp32 -> bf16 conversion truncates; compiled code uses
    the hardware conversion, which rounds to nearest even.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), rounded)


@triton.jit
def round_bf16(x, bits):
    """rounding.round_bf16: x a float32 tensor, bits tl.uint32 of its shape; a bfloat16 tensor."""
    top = (x.to(tl.uint32, bitcast=True) + (bits & 0xFFFF)) >> 16
    top = tl.where(x != x, 0x7FC0, top)
    return top.to(tl.uint16).to(tl.bfloat16, bitcast=True)
