// y = LayerNorm(x + bias + residual) in one pass over each row, forward only (inference), on the CPU.
//
// x, residual and y are (rows, hidden) row-major float32; bias (may be null), ln_weight and ln_bias
// are (hidden,). The sum goes into y, its mean and variance (of the centred values, so no
// cancellation) are taken from there in fp32, and y is normalised in place: one read of each input,
// one write of the output. Rows are split across OpenMP threads when there are enough of them; the
// row function is compiled per instruction set (BERTFAST_CLONES).
#include <cmath>
#include <cstdint>

#include "fast_math.h"
#include "ops.h"

namespace bertfast {

namespace {

BERTFAST_CLONES
void normalise_row(const float* xr, const float* bias, const float* rr, const float* ln_weight,
                   const float* ln_bias, float* yr, int64_t hidden, float eps) {
  const float inv_hidden = 1.0f / static_cast<float>(hidden);
  float sum = 0.0f;
  if (bias != nullptr) {
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < hidden; ++c) {
      const float h = xr[c] + bias[c] + rr[c];
      yr[c] = h;
      sum += h;
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < hidden; ++c) {
      const float h = xr[c] + rr[c];
      yr[c] = h;
      sum += h;
    }
  }
  const float mean = sum * inv_hidden;
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int64_t c = 0; c < hidden; ++c) {
    const float d = yr[c] - mean;
    squares += d * d;
  }
  const float rstd = 1.0f / std::sqrt(squares * inv_hidden + eps);
#pragma omp simd
  for (int64_t c = 0; c < hidden; ++c) yr[c] = (yr[c] - mean) * rstd * ln_weight[c] + ln_bias[c];
}

}  // namespace

void add_layernorm_forward(const float* x, const float* bias, const float* residual, const float* ln_weight,
                           const float* ln_bias, float* y, int64_t rows, int64_t hidden, float eps) {
#pragma omp parallel for schedule(static) if (rows * hidden > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    normalise_row(x + r * hidden, bias, residual + r * hidden, ln_weight, ln_bias, y + r * hidden, hidden, eps);
  }
}

}  // namespace bertfast
