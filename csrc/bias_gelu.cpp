// Fused bias + exact (erf) GELU on the CPU, forward and backward.
//
//   forward : y  = gelu(u),  u = x + b,  gelu(u) = u * Phi(u) = 0.5 u (1 + erf(u / sqrt 2))
//   backward: dx = dy * gelu'(u),  gelu'(u) = Phi(u) + u * phi(u),  db = sum over rows of dx
//
// x and dy are (rows, hidden) row-major float32, b is (hidden,). erf and exp are
// evaluated with branch-free polynomials so that the inner loops vectorise (libm's
// scalar erf would cost more than the whole memory traffic); both stay within a few
// 1e-7 of libm. Rows are split across OpenMP threads; the bias gradient is reduced in a
// fixed order, so it is deterministic.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fast_math.h"
#include "ops.h"

namespace bertfast {

namespace {

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

// erf(x) = x P(x^2) / Q(x^2) on [-4, 4] (|erf(4)| rounds to 1 in float); max error ~4e-7.
BERTFAST_INLINE float fast_erf(float x) {
  x = x > 4.0f ? 4.0f : (x < -4.0f ? -4.0f : x);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

// Compiled per instruction set (BERTFAST_CLONES): the polynomials are most of the cost.
BERTFAST_CLONES
void gelu_row(const float* xr, const float* b, float* yr, int64_t hidden) {
#pragma omp simd
  for (int64_t c = 0; c < hidden; ++c) {
    const float u = xr[c] + b[c];
    yr[c] = 0.5f * u * (1.0f + fast_erf(u * kInvSqrt2));
  }
}

}  // namespace

void bias_gelu_forward(const float* x, const float* b, float* y, int64_t rows, int64_t hidden) {
#pragma omp parallel for schedule(static) if (rows * hidden > 32768)
  for (int64_t r = 0; r < rows; ++r) gelu_row(x + r * hidden, b, y + r * hidden, hidden);
}

void bias_gelu_backward(const float* dy, const float* x, const float* b, float* dx, float* db, int64_t rows,
                        int64_t hidden) {
  // The bias gradient is summed in float over blocks of rows, then in double across blocks and
  // threads, which keeps it as accurate as PyTorch's reduction.
  constexpr int64_t kBlock = 32;
  const int64_t blocks = (rows + kBlock - 1) / kBlock;
  const int threads = omp_get_max_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * hidden, 0.0);
#pragma omp parallel num_threads(threads)
  {
    double* mine = partial.data() + static_cast<size_t>(omp_get_thread_num()) * hidden;
    std::vector<float> block_sum(hidden);
    float* acc = block_sum.data();
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      std::fill(acc, acc + hidden, 0.0f);
      const int64_t last = std::min(rows, (blk + 1) * kBlock);
      for (int64_t r = blk * kBlock; r < last; ++r) {
        const float* xr = x + r * hidden;
        const float* dyr = dy + r * hidden;
        float* dxr = dx + r * hidden;
#pragma omp simd
        for (int64_t c = 0; c < hidden; ++c) {
          const float u = xr[c] + b[c];
          const float cdf = 0.5f * (1.0f + fast_erf(u * kInvSqrt2));
          const float pdf = kInvSqrt2Pi * fast_exp_nonpositive(-0.5f * u * u);
          const float g = dyr[c] * (cdf + u * pdf);
          dxr[c] = g;
          acc[c] += g;
        }
      }
      for (int64_t c = 0; c < hidden; ++c) mine[c] += acc[c];
    }
  }
  for (int64_t c = 0; c < hidden; ++c) {
    double total = 0.0;
    for (int t = 0; t < threads; ++t) total += partial[static_cast<size_t>(t) * hidden + c];
    db[c] = static_cast<float>(total);
  }
}

}  // namespace bertfast
