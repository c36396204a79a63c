// The counter-based dropout mask that every backend shares (the formula is in dropout.cpp's header):
// keep(seed, row, col) = (mix32(mix32(col ^ k0) + (row ^ k1)) >> 1) >= threshold.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "fast_math.h"

namespace bertfast {

BERTFAST_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct Key {
  uint32_t k0, k1;
  explicit Key(uint64_t seed)
      : k0(mix32(static_cast<uint32_t>(seed) ^ 0x9e3779b9U)),
        k1(mix32(static_cast<uint32_t>(seed >> 32) ^ 0x7f4a7c15U)) {}
};

inline uint64_t seed_of(const at::Tensor& seed) {
  TORCH_CHECK_VALUE(seed.numel() == 1 && !seed.is_floating_point(), "seed must be a one-element integer tensor");
  return static_cast<uint64_t>(seed.item<int64_t>());
}

// The threshold and scale of bertfast.common.dropout: min(round(p 2^31), 2^31 - 1), and 1 / (1 - p) (0 at p = 1).
inline uint32_t threshold_of(double p) {
  return static_cast<uint32_t>(std::min(std::nearbyint(p * 2147483648.0), 2147483647.0));
}

inline float keep_scale_of(double p) { return p >= 1.0 ? 0.0f : static_cast<float>(1.0 / (1.0 - p)); }

}  // namespace bertfast
