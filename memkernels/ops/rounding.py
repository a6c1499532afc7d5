"""Stochastic rounding of float32 to bfloat16 from a counter-based hash: the reference every backend mirrors.

Why counter-based: an element's random bits are a pure function of (key, element index), with no generator
state to seed, carry or split between threads. Every backend (this module, numba, Triton, CUDA) computes the
same function, so a step gives the same bits whatever the backend, the thread count or the order in which
elements are visited, and a rerun with the same seed repeats it bit for bit.

The key: tensor_key folds (seed, step, tensor) into 32 bits on the host, once per tensor and call; kernels see
only the key. random_bits(key, i) = mix32(mix32(lo + k) ^ k) with lo the low 32 bits of the element index i and
k = key ^ mix32(hi), hi its high 32 bits (k = key below 2**32 elements, as mix32(0) = 0). The key enters both
rounds: with one round, mix32(i + key) or mix32(i ^ key), the stream of one key is the stream of another shifted
or permuted by a fixed offset, so two tensors' roundings could repeat each other element for element.
mix32 is the "lowbias32" mixer (xorshift-multiply, two rounds); all arithmetic is modulo 2**32.

Two writes, one hash: a step's bfloat16 writes of an element are numbered (the op's states in spec order, then
the previous gradient, the kept estimate, the param: key_of_write), and writes 2j and 2j + 1 share the key of
column j: the first rounds by the low 16 of random_bits(key, i), the second by the high 16. A rounding needs
16 bits and the hash makes 32, and on the CPU the mixes are most of what a stochastic write adds to a step
bound by its arithmetic (AdamW with the trajectory correction writes three bfloat16 lists: two hashes, not
three). lowbias32's low and high halves show no dependence (tests/test_rounding.py: their joint counts and
correlations), so neither do the two writes' roundings.

The rounding: the low 16 random bits are added to x's float32 bit pattern and the top 16 bits kept, so |x|
rounds away from zero to its upper bfloat16 neighbour with probability (its distance from the lower one) /
(their spacing), exactly in steps of 2**-16: the result is unbiased, E[round_bf16(x)] = x. The sign bit rides
along (the magnitude is rounded). Values exactly representable in bfloat16 (low 16 bits zero) never move, and
+-Inf stay +-Inf; NaN becomes the quiet NaN 0x7FC0, as torch's conversion makes it. Above the largest finite
bfloat16 (0x7F7F, 3.39e38) the upper neighbour is Inf: a float32 x there rounds to +-Inf with probability
(|x| - 3.39e38) / 2**120. Subnormals need no case: bfloat16 shares float32's exponent, so a subnormal float32
rounds between its two subnormal (or zero) bfloat16 neighbours by the same rule.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
# lowbias32's multipliers (shifts 16, 15, 16), the second as the integer below 2**31 in magnitude that equals it
# modulo 2**32: a product with a 32-bit x then stays within int64, so no tensor product overflows (a compiled
# kernel's signed overflow is undefined), and its low 32 bits are the same
_MIX = (0x7FEB352D, 0x846CA68B - (1 << 32))
_KEY_START = 0x6A09E667  # tensor_key's starting state: any constant; this one is sqrt(2)'s fraction
_BF16_NAN = 0x7FC0


def mix32(x):
    """A bijection of [0, 2**32) that scrambles every input bit into every output bit; x a Python int or an
    int64 tensor of values in that range."""
    x = x ^ (x >> 16)
    x = (x * _MIX[0]) & MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX[1]) & MASK32
    return x ^ (x >> 16)


def _word_pair(name: str, value: object) -> tuple[int, int]:
    """An integer in [0, 2**64) as its two 32-bit words, low first; anything else refused by name."""
    if isinstance(value, bool):
        raise TypeError(f"tensor_key: {name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"tensor_key: {name} must be an integer, got {type(value).__name__}") from None
    if not 0 <= value < 1 << 64:
        raise ValueError(f"tensor_key: {name} must be in [0, 2**64), got {value}")
    return value & MASK32, value >> 32


def _absorb(state, words):
    """state = mix32(state ^ word) for each word in turn (Python ints or int64 tensors)."""
    for word in words:
        state = mix32(state ^ word)
    return state


def _absorbed(seed: int, step: int | Tensor) -> int | Tensor:
    """The state after seed and step; a tensor for a step count tensor, whose words are taken on its device."""
    if isinstance(step, Tensor):
        step = step.to(torch.int64)
        words = (step & MASK32, step >> 32)
    else:
        words = _word_pair("step", step)
    return _absorb(_KEY_START, (*_word_pair("seed", seed), *words))


def tensor_key(seed: int, step: int, tensor: int) -> int:
    """The 32-bit key of one tensor's roundings in one call.

    Each of seed, step and tensor (an integer in [0, 2**64)) is taken as two 32-bit words, low first, and
    absorbed in turn by state = mix32(state ^ word): each absorption is a bijection of the state and of the
    word, so calls that differ in one word (seed, step or tensor below 2**32) never share a key.
    """
    return _absorb(_absorbed(seed, step), _word_pair("tensor", tensor))


def tensor_keys(seed: int, step: int, tensors: Tensor) -> Tensor:
    """tensor_key(seed, step, t) for each t of tensors (int64 >= 0): an optimizer's keys of one call in a few
    tensor operations instead of a Python call per tensor."""
    if tensors.dtype != torch.int64 or bool((tensors < 0).any()):
        raise ValueError("tensor_keys: tensors must be int64 values >= 0")
    return keys_at(seed, step, tensors)


def keys_at(seed: int, step: int | Tensor, tensors: Tensor) -> Tensor:
    """tensor_keys where the caller knows tensors are int64 values >= 0, and step may be a tensor of one
    integral value >= 0 on tensors' device (a device-mode step count): then no value is read on the host, so
    torch.compile traces the keys and a CUDA graph replays them with the count it advances."""
    return _absorb(_absorbed(seed, step), (tensors & MASK32, tensors >> 32))


def random_bits(key: int, index: Tensor) -> Tensor:
    """32 random bits (int64 values in [0, 2**32)) for each element index (int64, >= 0) under key."""
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= MASK32:
        raise ValueError(f"random_bits: key must be an int in [0, 2**32), got {key!r}")
    if index.dtype != torch.int64:
        raise TypeError(f"random_bits: index must be an int64 tensor, got {index.dtype}")
    if bool((index < 0).any()):
        raise ValueError("random_bits: element indices must be >= 0")
    k = key ^ mix32(index >> 32)
    return mix32(mix32(((index & MASK32) + k) & MASK32) ^ k)


def key_of_write(write: int) -> tuple[int, int]:
    """The key column of a step's bfloat16 write number `write` and the shift that brings its 16 random bits
    down: writes 2j and 2j + 1 share column j (the module docstring)."""
    return write // 2, 16 * (write % 2)


def key_columns(writes: int) -> int:
    """Key columns for `writes` numbered writes: one per pair."""
    return (writes + 1) // 2


def round_bf16(x: Tensor, bits: Tensor) -> Tensor:
    """x (float32) rounded stochastically to bfloat16 by the low 16 of bits (random_bits' values)."""
    if x.dtype != torch.float32:
        raise TypeError(f"round_bf16: x must be float32, got {x.dtype}")
    if bits.dtype != torch.int64 or bits.shape != x.shape:
        raise ValueError(f"round_bf16: bits must be int64 of x's shape {tuple(x.shape)}, got {bits.dtype} "
                         f"{tuple(bits.shape)}")
    word = x.view(torch.int32).to(torch.int64) & MASK32
    top = (word + (bits & 0xFFFF)) >> 16  # below 2**16 but for NaNs, whose carry may run past the sign bit
    top = torch.where(x.isnan(), _BF16_NAN, top)
    return torch.where(top >= 0x8000, top - 0x10000, top).to(torch.int16).view(torch.bfloat16)
