// Stochastic rounding of float to bfloat16 from a counter-based hash, for the kernels and the host test module:
// memkernels/ops/rounding.py per element, bit for bit (its docstring states the rules). uint32_t arithmetic
// wraps modulo 2**32, as the reference's. Included by math.h, which defines MK_HD.
#pragma once

#include <cstdint>
#include <cstring>

namespace memkernels {

// rounding.mix32: lowbias32, a bijection of the 32-bit words.
MK_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// rounding.random_bits: 32 random bits of element `index` under `key` (tensor_key's, from the host).
MK_HD uint32_t random_bits(uint32_t key, uint64_t index) {
  const uint32_t k = key ^ mix32(uint32_t(index >> 32));
  return mix32(mix32(uint32_t(index) + k) ^ k);
}

// rounding.round_bf16: the bits of x rounded to bfloat16 by the low 16 of `bits`; a NaN gives 0x7FC0.
MK_HD uint16_t round_bf16(float x, uint32_t bits) {
  if (x != x) return 0x7FC0;
  uint32_t word;
#if defined(__CUDA_ARCH__)
  word = __float_as_uint(x);
#else
  std::memcpy(&word, &x, sizeof word);
#endif
  return uint16_t((word + (bits & 0xFFFFu)) >> 16);
}

// rounding_keys' columns for an op of NS states (memkernels._ops.KEY_COLUMNS): its states in spec order (an
// absent one keeps its column), then grad_refs, then hvps, then params (param_rounding="stochastic", which
// the CUDA backend refuses: no CUDA code reads that column yet).
template <int NS>
struct KeyCols {
  static constexpr int kGradRef = NS;
  static constexpr int kHvp = NS + 1;
  static constexpr int kParam = NS + 2;
  static constexpr int kWidth = NS + 3;
};

// A stochastic bfloat16 write, as backends/reference.py's _store makes it: x rounded by the bits of element
// `index` (its offset in its tensor) under its list's key (its tensor's rounding_keys entry, column KeyCols).
MK_HD uint16_t rounded_write(float x, int64_t key, uint64_t index) {
  return round_bf16(x, random_bits(uint32_t(key), index));
}

}  // namespace memkernels
