// Native CPU kernels of bertfast. Each works on contiguous float32 buffers;
// module.cpp checks shapes and exposes them to Python as bertfast._C.
#pragma once
#include <cstdint>

namespace bertfast {

void bias_gelu_forward(const float* x, const float* b, float* y, int64_t rows, int64_t hidden);
void bias_gelu_backward(const float* dy, const float* x, const float* b, float* dx, float* db, int64_t rows,
                        int64_t hidden);

}  // namespace bertfast
