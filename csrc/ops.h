// Native CPU kernels of bertfast. Each works on contiguous float32 buffers;
// module.cpp checks shapes and exposes them to Python as bertfast._C.
#pragma once
#include <cstdint>

namespace bertfast {

void bias_gelu_forward(const float* x, const float* b, float* y, int64_t rows, int64_t hidden);
void bias_gelu_backward(const float* dy, const float* x, const float* b, float* dx, float* db, int64_t rows,
                        int64_t hidden);

// y[r, c] = x[r, c] * scale where (hash(seed, row_ids[r], c) >> 1) >= threshold, else 0, for (rows, cols) x
// (threshold = min(round(p * 2^31), 2^31 - 1); see dropout.cpp). Backward is the same call on dy. x and y may alias.
void dropout_apply(const float* x, float* y, int64_t rows, int64_t cols, const int64_t* row_ids, uint64_t seed,
                   uint32_t threshold, float scale);
// The 32-bit hash of element (row, col) that dropout shifts and compares with its threshold (for tests).
uint32_t dropout_bits(uint64_t seed, int64_t row, int64_t col);

}  // namespace bertfast
