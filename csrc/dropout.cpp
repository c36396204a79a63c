// Dropout on the CPU with a counter-based mask: nothing is stored, backward regenerates it.
//
//   y[i] = x[i] * scale  if keep(seed, i)  else 0,   keep(seed, i) = hash(seed, i) >= threshold
//
// hash is two rounds of a 32-bit integer finaliser (Wellons' "lowbias32", avalanche bias
// ~0.1%) over the element index, keyed by the 64-bit seed: a uniform 32-bit value per element
// that depends on nothing but (seed, i). threshold = round(p * 2^32) (2^32 drops everything), so
// the mask of a (seed, tensor) pair is the same in forward and backward, on any thread count.
// PyTorch's bernoulli_ draws from one Mersenne Twister stream element by element; this costs a
// few integer operations per element, vectorises, and splits across OpenMP threads.
#include <cstdint>
#include <climits>

#include "ops.h"

namespace bertfast {

namespace {

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

uint32_t dropout_bits(uint64_t seed, int64_t index) {
  const uint64_t key = splitmix64(seed);
  const auto i = static_cast<uint64_t>(index);
  return mix32(mix32(static_cast<uint32_t>(i) ^ static_cast<uint32_t>(key)) +
               (static_cast<uint32_t>(i >> 32) ^ static_cast<uint32_t>(key >> 32)));
}

void dropout_apply(const float* x, float* y, int64_t n, uint64_t seed, uint64_t threshold, float scale) {
  const uint64_t key = splitmix64(seed);
  const auto k0 = static_cast<uint32_t>(key);
  const auto k1 = static_cast<uint32_t>(key >> 32);
  const bool drop_all = threshold > UINT32_MAX;  // p = 1
  const auto limit = static_cast<uint32_t>(drop_all ? 0 : threshold);
  constexpr int64_t kChunk = 1 << 14;  // elements per OpenMP work item
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t begin = chunk * kChunk;
    const int32_t count = static_cast<int32_t>(begin + kChunk < n ? kChunk : n - begin);
    const float* xc = x + begin;
    float* yc = y + begin;
    if (drop_all) {
      for (int32_t j = 0; j < count; ++j) yc[j] = 0.0f;
      continue;
    }
    // 32-bit arithmetic in the loop so that it vectorises; a chunk never straddles a multiple of 2^32,
    // so the high word of the index is one value per chunk.
    const auto low = static_cast<uint32_t>(begin);
    const uint32_t high = static_cast<uint32_t>(static_cast<uint64_t>(begin) >> 32) ^ k1;
#pragma omp simd
    for (int32_t j = 0; j < count; ++j) {
      const uint32_t bits = mix32(mix32((low + static_cast<uint32_t>(j)) ^ k0) + high);
      yc[j] = xc[j] * (bits >= limit ? scale : 0.0f);  // a multiply, like PyTorch's: inf * 0 stays NaN
    }
  }
}

}  // namespace bertfast
