// y = LayerNorm(x + bias + residual) in one pass over each row, forward only (inference), on the CPU:
// bertfast::add_layernorm.
//
// x, residual and y are (rows, hidden) row-major float32 or bf16; bias (may be absent), ln_weight and ln_bias
// are (hidden,). The sum goes into a float32 row, its mean and variance (of the centred values, so no
// cancellation) are taken from there, and the row is normalised in place: one read of each input, one write of
// the output. Rows are split across torch's threads when there are enough of them; the row function is
// compiled per instruction set (BERTFAST_CLONES).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "fast_math.h"
#include "op_utils.h"

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

template <typename T>
void add_layernorm_forward(const T* x, const float* bias, const T* residual, const float* ln_weight,
                           const float* ln_bias, T* y, int64_t rows, int64_t hidden, float eps) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(hidden, 1)), [&](int64_t r0, int64_t r1) {
    Rows<T> io(hidden, 2);
    for (int64_t r = r0; r < r1; ++r) {
      float* yr = io.out(y + r * hidden);
      normalise_row(io.load(x + r * hidden, 0), bias, io.load(residual + r * hidden, 1), ln_weight, ln_bias, yr,
                    hidden, eps);
      io.store(yr, y + r * hidden);
    }
  });
}

at::Tensor add_layernorm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                             const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps) {
  TORCH_CHECK_VALUE(ln_weight.dim() == 1, "ln_weight must be 1-D, got ", ln_weight.sizes());
  const int64_t hidden = ln_weight.size(0);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == hidden, "x must end in a dimension of ", hidden, ", got ",
                    x.sizes());
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), "x ", x.sizes(), " and residual ", residual.sizes(),
                    " differ in shape");
  const at::Tensor w = parameter(ln_weight, hidden, "ln_weight"), b = parameter(ln_bias, hidden, "ln_bias");
  const at::Tensor shift = bias ? parameter(*bias, hidden, "bias") : at::Tensor();
  const int64_t rows = hidden == 0 ? 0 : x.numel() / hidden;
  return dispatch_float_bf16(x.scalar_type(), "add_layernorm", [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor xc = activation(x, x.scalar_type(), "x"), rc = activation(residual, x.scalar_type(), "residual");
    at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    add_layernorm_forward<T>(data_of<T>(xc), shift.defined() ? shift.const_data_ptr<float>() : nullptr,
                             data_of<T>(rc), w.const_data_ptr<float>(), b.const_data_ptr<float>(),
                             mutable_data_of<T>(y), rows, hidden, static_cast<float>(eps));
    return y;
  });
}

}  // namespace

}  // namespace bertfast

TORCH_LIBRARY_IMPL(bertfast, CPU, m) { m.impl("add_layernorm", &bertfast::add_layernorm_cpu); }
