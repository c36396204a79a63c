// Native CPU kernels of bertfast. Each works on contiguous float32 buffers;
// module.cpp checks shapes and exposes them to Python as bertfast._C.
#pragma once
#include <cstdint>

namespace bertfast {

void bias_gelu_forward(const float* x, const float* b, float* y, int64_t rows, int64_t hidden);
void bias_gelu_backward(const float* dy, const float* x, const float* b, float* dx, float* db, int64_t rows,
                        int64_t hidden);

// y = x * scale where hash(seed, i) >= threshold, else 0 (threshold = round(p * 2^32); see dropout.cpp).
// Backward is the same call on dy with the same seed. x and y may alias.
void dropout_apply(const float* x, float* y, int64_t n, uint64_t seed, uint64_t threshold, float scale);
// The 32-bit value element ``index`` is compared with the threshold (for tests of the mask's statistics).
uint32_t dropout_bits(uint64_t seed, int64_t index);

}  // namespace bertfast
