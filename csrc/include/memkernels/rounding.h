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

// The write numbers of an op of NS states (memkernels/ops/rounding.py, key_of_write): its states in spec order
// (an absent one keeps its number), then grad_refs, hvps and params (param_rounding="stochastic", which the
// CUDA backend refuses: no CUDA code writes params so yet); writes 2j and 2j + 1 share key column j, so
// rounding_keys has kWidth columns (memkernels._ops.KEY_COLUMNS).
template <int NS>
struct Writes {
  static constexpr int kGradRef = NS;
  static constexpr int kHvp = NS + 1;
  static constexpr int kParam = NS + 2;
  static constexpr int kWidth = (NS + 4) / 2;
};

// A stochastic bfloat16 write, as backends/reference.py's _store makes it: x rounded by the bits of write
// number `write` (the low or high half of the hash under keys[write / 2], its tensor's rounding_keys row) at
// element `index` (its offset in its tensor).
MK_HD uint16_t rounded_write(float x, const int64_t* keys, int write, uint64_t index) {
  return round_bf16(x, random_bits(uint32_t(keys[write / 2]), index) >> (16 * (write % 2)));
}

}  // namespace memkernels
