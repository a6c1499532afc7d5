"""Stochastic rounding to bfloat16 for the numba kernels: memkernels/ops/rounding.py per element, same bits.

Element functions, force-inlined into a kernel's loop. numba widens uint32 arithmetic to 64 bits (a product of
two uint32 is a uint64), so every step that may carry past bit 31 is cast back to uint32, which keeps its low
32 bits: arithmetic modulo 2**32, as the reference's. bfloat16 results are their 16 bits as uint16, the view of
bfloat16 arrays in the kernels (_dtypes.py).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._log1p import _as_uint

_M1, _M2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)
_LOW16 = np.uint32(0xFFFF)
_BF16_NAN = np.uint16(0x7FC0)


@njit(forceinline=True)
def mix32(x):
    """rounding.mix32 on a uint32."""
    x = np.uint32(x ^ (x >> np.uint32(16)))
    x = np.uint32(x * _M1)
    x = np.uint32(x ^ (x >> np.uint32(15)))
    x = np.uint32(x * _M2)
    return np.uint32(x ^ (x >> np.uint32(16)))


@njit(forceinline=True)
def random_bits(key, index):
    """rounding.random_bits for one element: key a uint32, index an int64 >= 0."""
    k = np.uint32(key ^ mix32(np.uint32(index >> 32)))
    return mix32(np.uint32(mix32(np.uint32(np.uint32(index & 0xFFFFFFFF) + k)) ^ k))


@njit(forceinline=True)
def round_bf16(x, bits):
    """rounding.round_bf16 for one float32 x: its bfloat16 bits (uint16)."""
    if x != x:
        return _BF16_NAN
    return np.uint16((_as_uint(x) + (bits & _LOW16)) >> np.uint32(16))
