// bfloat16 storage for the CPU kernels: they compute in float32 and load / store bf16 at the edges.
#pragma once
#include <cstdint>
#include <cstring>

#include "fast_math.h"

namespace bertfast {

// The bits of a bfloat16 (the layout of at::BFloat16), a type of its own so that overloads tell it apart.
struct bf16 {
  uint16_t bits;
};

BERTFAST_INLINE float to_float(float x) { return x; }
BERTFAST_INLINE float to_float(bf16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
BERTFAST_INLINE T from_float(float f);
template <>
BERTFAST_INLINE float from_float<float>(float f) {
  return f;
}
// Round to nearest even, NaN kept a (quiet) NaN: what at::BFloat16 and vcvtneps2bf16 do.
template <>
BERTFAST_INLINE bf16 from_float<bf16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffU + ((u >> 16) & 1U)) >> 16;
  const bool nan = (u & 0x7fffffffU) > 0x7f800000U;
  return bf16{static_cast<uint16_t>(nan ? ((u >> 16) | 0x40U) : rounded)};
}

// Whole rows: dst[i] = float(src[i]), and dst[i] = bf16(src[i]) (with AVX512-BF16's conversion where the
// CPU has it).
void bf16_to_float(const bf16* src, float* dst, int64_t n);
void float_to_bf16(const float* src, bf16* dst, int64_t n);

}  // namespace bertfast
