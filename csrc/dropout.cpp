// Dropout on the CPU with a counter-based mask: nothing is stored, backward regenerates it.
//
//   y[r, c] = x[r, c] * scale  if keep(seed, row[r], c)  else 0
//   keep(seed, row, col) = (hash(seed, row, col) >> 1) >= threshold,  threshold = min(round(p 2^31), 2^31 - 1)
//   hash(seed, row, col) = mix32(mix32(col ^ k0) + (row ^ k1)),  k0 = mix32(lo32(seed) ^ 0x9e3779b9),
//                          k1 = mix32(hi32(seed) ^ 0x7f4a7c15)     (all arithmetic mod 2^32)
//
// mix32 is Wellons' "lowbias32" integer finaliser (avalanche bias ~0.1%). The same function, bit for
// bit, is what the Triton kernels (bertfast.kernels.layernorm_common.dropout_keep) and the PyTorch
// reference (bertfast.ops.dropout.keep_mask) compute, so every backend keeps the same elements for a
// seed. The row of an element is its token (and, for attention probabilities, token * heads + head);
// the column its position in the row. PyTorch's bernoulli_ draws from one Mersenne Twister stream
// element by element; this costs one mix32 per element (the column hashes are shared by all rows),
// vectorises, and splits across OpenMP threads.
#include <cstddef>
#include <cstdint>
#include <vector>

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

struct Key {
  uint32_t k0, k1;
  explicit Key(uint64_t seed)
      : k0(mix32(static_cast<uint32_t>(seed) ^ 0x9e3779b9U)),
        k1(mix32(static_cast<uint32_t>(seed >> 32) ^ 0x7f4a7c15U)) {}
};

}  // namespace

uint32_t dropout_bits(uint64_t seed, int64_t row, int64_t col) {
  const Key key(seed);
  return mix32(mix32(static_cast<uint32_t>(col) ^ key.k0) + (static_cast<uint32_t>(row) ^ key.k1));
}

void dropout_apply(const float* x, float* y, int64_t rows, int64_t cols, const int64_t* row_ids, uint64_t seed,
                   uint32_t threshold, float scale) {
  const Key key(seed);
  std::vector<uint32_t> col_hash(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) col_hash[c] = mix32(static_cast<uint32_t>(c) ^ key.k0);
  const uint32_t* ch = col_hash.data();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t row_term = static_cast<uint32_t>(row_ids[r]) ^ key.k1;
    const float* xr = x + r * cols;
    float* yr = y + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const uint32_t bits = mix32(ch[c] + row_term);
      yr[c] = xr[c] * ((bits >> 1) >= threshold ? scale : 0.0f);  // a multiply, like PyTorch's: inf * 0 is NaN
    }
  }
}

}  // namespace bertfast
