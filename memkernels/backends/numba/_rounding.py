"""Stochastic rounding to bfloat16 for the numba kernels: memkernels/ops/rounding.py per element, same bits.

Element functions, force-inlined into a kernel's loop; store_rounded() and stores_rounded() are the kernels'
stochastic stores (kernels.py), resolved per array type at compile time like _dtypes.store(). numba widens
uint32 arithmetic to 64 bits (a product of two uint32 is a uint64), so every step that may carry past bit 31 is
cast back to uint32, which keeps its low 32 bits: arithmetic modulo 2**32, as the reference's. bfloat16
results are their 16 bits as uint16, the view of bfloat16 arrays in the kernels (_dtypes.py).
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from ._dtypes import store
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


def store_rounded(a, i, value, key, index):
    """a[i] = value: a bfloat16 array's (uint16 bits) by round_bf16 under key at element index, any other
    array's as _dtypes.store rounds it."""


def stores_rounded(arrays, i, values, keys, row, column, index):
    """store_rounded() of each value into its array of a tuple of views, under keys[row, column], [row, column + 1],
    ...; nothing for an absent one (None), which still takes its column."""


@overload(store_rounded)
def _store_rounded(a, i, value, key, index):
    if a.dtype == types.uint16:
        def store_bf16(a, i, value, key, index):
            a[i] = round_bf16(np.float32(value), random_bits(np.uint32(key), index))
        return store_bf16
    return lambda a, i, value, key, index: store(a, i, value)


@overload(stores_rounded)
def _stores_rounded(arrays, i, values, keys, row, column, index):
    if len(arrays) == 0:
        return lambda arrays, i, values, keys, row, column, index: None
    if arrays[0] == types.none:
        def absent_first(arrays, i, values, keys, row, column, index):
            stores_rounded(arrays[1:], i, values[1:], keys, row, column + 1, index)
        return absent_first

    def first(arrays, i, values, keys, row, column, index):
        store_rounded(arrays[0], i, values[0], keys[row, column], index)
        stores_rounded(arrays[1:], i, values[1:], keys, row, column + 1, index)
    return first
