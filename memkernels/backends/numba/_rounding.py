"""Stochastic rounding to bfloat16 for the numba kernels: memkernels/ops/rounding.py per element, same bits.

Element functions, force-inlined into a kernel's loop; store_rounded() and stores_rounded() are the kernels'
stochastic stores (kernels.py), resolved per array type at compile time like _dtypes.store(). numba widens
uint32 arithmetic to 64 bits (a product of two uint32 is a uint64), so every step that may carry past bit 31 is
cast back to uint32, which keeps its low 32 bits: arithmetic modulo 2**32, as the reference's. bfloat16
results are their 16 bits as uint16, the view of bfloat16 arrays in the kernels (_dtypes.py).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, types
from numba.extending import overload

from ...ops import rounding
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
def block_key(key, index):
    """The k of rounding.random_bits: key ^ mix32 of index's high word, the same for every index of a block
    of 2**32 elements. A kernel's chunk lies in one block, so the kernel takes it once per chunk and list
    (chunk_keys), out of its element loop."""
    return np.uint32(np.uint32(key) ^ mix32(np.uint32(index >> 32)))


@njit(forceinline=True)
def block_bits(k, low):
    """rounding.random_bits from its block's k (block_key) and the index's low word (a uint32)."""
    return mix32(np.uint32(mix32(np.uint32(low + k)) ^ k))


@njit(forceinline=True)
def low_word(index):
    """index's low 32 bits, a uint32."""
    return np.uint32(index & 0xFFFFFFFF)


@njit(forceinline=True)
def random_bits(key, index):
    """rounding.random_bits for one element: key a uint32, index an int64 >= 0."""
    return block_bits(block_key(key, index), low_word(index))


@functools.cache
def chunk_keys(first: int, count: int):
    """A function (keys, row, start) -> the block keys (block_key) at element `start` of writes first, ...,
    first + count - 1 (rounding.key_of_write: two writes share a key column, so two entries may be the same key):
    a tuple of uint32, read from the keys table once per chunk. Read per element, the keys and the high word's
    mix ran in the element loop (three mixes a hash instead of two), and LLVM built that loop with 256-bit
    vectors: stochastic bf16 AdamW ran 1.45x torch's fused step at 64M instead of 0.93x."""
    if count == 0:
        return njit(forceinline=True)(lambda keys, row, start: ())
    head, column = chunk_keys(first, count - 1), rounding.key_of_write(first + count - 1)[0]

    @njit(forceinline=True)
    def keys_of(keys, row, start):
        return head(keys, row, start) + (block_key(keys[row, column], start),)
    return keys_of


def shifts(first: int, count: int) -> tuple[int, ...]:
    """rounding.key_of_write's shifts of writes first, ..., first + count - 1: constants of a kernel."""
    return tuple(rounding.key_of_write(w)[1] for w in range(first, first + count))


@njit(forceinline=True)
def round_bf16(x, bits):
    """rounding.round_bf16 for one float32 x: its bfloat16 bits (uint16)."""
    if x != x:
        return _BF16_NAN
    return np.uint16((_as_uint(x) + (bits & _LOW16)) >> np.uint32(16))


def store_rounded(a, i, value, key, shift, low):
    """a[i] = value: a bfloat16 array's (uint16 bits) by round_bf16 of the random bits of the element whose
    index has the low word `low` (a uint32) under its block's key (block_key), shifted down by `shift`
    (rounding.key_of_write), any other array's as _dtypes.store rounds it. Two writes under one key hash the
    same (key, low): LLVM computes that once."""


def stores_rounded(arrays, i, values, keys, shifts, low):
    """store_rounded() of each value into its array of a tuple of views, each under its key and shift of the
    tuples keys (chunk_keys) and shifts; nothing for an absent one (None), which still takes its write."""


@overload(store_rounded)
def _store_rounded(a, i, value, key, shift, low):
    if a.dtype == types.uint16:
        def store_bf16(a, i, value, key, shift, low):
            a[i] = round_bf16(np.float32(value), np.uint32(block_bits(key, low) >> np.uint32(shift)))
        return store_bf16
    return lambda a, i, value, key, shift, low: store(a, i, value)


@overload(stores_rounded)
def _stores_rounded(arrays, i, values, keys, shifts, low):
    if len(arrays) == 0:
        return lambda arrays, i, values, keys, shifts, low: None
    if arrays[0] == types.none:
        def absent_first(arrays, i, values, keys, shifts, low):
            stores_rounded(arrays[1:], i, values[1:], keys[1:], shifts[1:], low)
        return absent_first

    def first(arrays, i, values, keys, shifts, low):
        store_rounded(arrays[0], i, values[0], keys[0], shifts[0], low)
        stores_rounded(arrays[1:], i, values[1:], keys[1:], shifts[1:], low)
    return first
