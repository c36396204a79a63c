// Fused bias + exact (erf) GELU on the CPU, forward and backward.
//
//   forward : y  = gelu(x + b)
//   backward: dx = dy * gelu'(x + b),   gelu'(u) = Phi(u) + u * phi(u)
//
// x and dy are (rows, hidden) row-major float32, b is (hidden,). The bias
// gradient is the column sum of dx, which the caller reduces.
#include <cmath>
#include <cstdint>

#include "ops.h"

namespace bertfast {

namespace {
constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
}  // namespace

void bias_gelu_forward(const float* x, const float* b, float* y, int64_t rows, int64_t hidden) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * hidden;
    float* yr = y + r * hidden;
    for (int64_t c = 0; c < hidden; ++c) {
      const float u = xr[c] + b[c];
      yr[c] = 0.5f * u * (1.0f + std::erf(u * kInvSqrt2));
    }
  }
}

void bias_gelu_backward(const float* dy, const float* x, const float* b, float* dx, int64_t rows,
                        int64_t hidden) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * hidden;
    const float* dyr = dy + r * hidden;
    float* dxr = dx + r * hidden;
    for (int64_t c = 0; c < hidden; ++c) {
      const float u = xr[c] + b[c];
      const float cdf = 0.5f * (1.0f + std::erf(u * kInvSqrt2));
      const float pdf = kInvSqrt2Pi * std::exp(-0.5f * u * u);
      dxr[c] = dyr[c] * (cdf + u * pdf);
    }
  }
}

}  // namespace bertfast
