// Gated GELU on the CPU, forward and backward: bertfast::geglu(_backward).
//
//   forward : y = gelu(a) * g,  x = [a | g] (rows, 2 N) -> y (rows, N),  exact (erf) GELU
//   backward: da = dy * g * gelu'(a),  dg = dy * gelu(a),  dx = [da | dg] in one pass
//
// The gated MLP of ModernBERT (and of the rotary encoders' GeGLU layers) after its bias-free input
// projection. float32 or bf16 rows, computed in float32; rows split across torch's threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "gelu_math.h"
#include "op_utils.h"

namespace bertfast {

namespace {

BERTFAST_CLONES
void geglu_row(const float* xr, float* yr, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) yr[c] = gelu(xr[c]) * xr[n + c];
}

BERTFAST_CLONES
void geglu_grad_row(const float* dyr, const float* xr, float* dxr, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const float a = xr[c], g = xr[n + c];
    dxr[c] = dyr[c] * g * gelu_derivative(a);
    dxr[n + c] = dyr[c] * gelu(a);
  }
}

int64_t half_width(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) % 2 == 0,
                    "geglu needs an even last dimension (value and gate halves), got ", x.sizes());
  return x.size(-1) / 2;
}

at::Tensor geglu_cpu(const at::Tensor& x) {
  const int64_t n = half_width(x);
  const int64_t rows = n == 0 ? 0 : x.numel() / (2 * n);
  return dispatch_float_bf16(x.scalar_type(), "geglu", [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor xc = activation(x, x.scalar_type(), "x");
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = n;
    at::Tensor y = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
    const T* xs = data_of<T>(xc);
    T* ys = mutable_data_of<T>(y);
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
      Rows<T> in(2 * n, 1), out(n, 0);
      for (int64_t r = r0; r < r1; ++r) {
        float* yr = out.out(ys + r * n);
        geglu_row(in.load(xs + r * 2 * n, 0), yr, n);
        out.store(yr, ys + r * n);
      }
    });
    return y;
  });
}

at::Tensor geglu_backward_cpu(const at::Tensor& dy, const at::Tensor& x) {
  const int64_t n = half_width(x);
  const int64_t rows = n == 0 ? 0 : x.numel() / (2 * n);
  TORCH_CHECK_VALUE(dy.numel() == rows * n, "dy must have x's rows and half its width, got ", dy.sizes(), " for x ",
                    x.sizes());
  return dispatch_float_bf16(x.scalar_type(), "geglu_backward", [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor xc = activation(x, x.scalar_type(), "x");
    const at::Tensor dyc = activation(dy, x.scalar_type(), "dy");
    at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    const T* xs = data_of<T>(xc);
    const T* dys = data_of<T>(dyc);
    T* dxs = mutable_data_of<T>(dx);
    at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
      Rows<T> wide(2 * n, 1), narrow(n, 1);
      for (int64_t r = r0; r < r1; ++r) {
        float* dxr = wide.out(dxs + r * 2 * n);
        geglu_grad_row(narrow.load(dys + r * n, 0), wide.load(xs + r * 2 * n, 0), dxr, n);
        wide.store(dxr, dxs + r * 2 * n);
      }
    });
    return dx;
  });
}

}  // namespace

}  // namespace bertfast

TORCH_LIBRARY_IMPL(bertfast, CPU, m) {
  m.impl("geglu", &bertfast::geglu_cpu);
  m.impl("geglu_backward", &bertfast::geglu_backward_cpu);
}
