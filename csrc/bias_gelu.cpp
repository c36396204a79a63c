// Fused bias + exact (erf) GELU on the CPU, forward and backward: bertfast::bias_gelu(_backward).
//
//   forward : y  = gelu(u),  u = x + b,  gelu(u) = u * Phi(u) = 0.5 u (1 + erf(u / sqrt 2))
//   backward: dx = dy * gelu'(u),  gelu'(u) = Phi(u) + u * phi(u),  db = sum over rows of dx
//
// x and dy are (rows, hidden) row-major float32 or bf16, b is (hidden,) (float32 here). erf and exp are
// evaluated with branch-free polynomials so that the inner loops vectorise (libm's scalar erf would cost
// more than the whole memory traffic); both stay within a few 1e-7 of libm. Rows are split across torch's
// threads; the bias gradient is summed per block of rows and then across blocks in a fixed order, so it
// does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fast_math.h"
#include "gelu_math.h"
#include "op_utils.h"

namespace bertfast {

namespace {

constexpr int64_t kBlock = 32;  // rows per partial sum of the bias gradient

// Compiled per instruction set (BERTFAST_CLONES): the polynomials are most of the cost.
BERTFAST_CLONES
void gelu_row(const float* xr, const float* b, float* yr, int64_t hidden) {
#pragma omp simd
  for (int64_t c = 0; c < hidden; ++c) {
    yr[c] = gelu(xr[c] + b[c]);
  }
}

// dx of one row; its values are added to acc (the block's bias-gradient sum).
BERTFAST_CLONES
void gelu_grad_row(const float* dyr, const float* xr, const float* b, float* dxr, float* acc, int64_t hidden) {
#pragma omp simd
  for (int64_t c = 0; c < hidden; ++c) {
    const float g = dyr[c] * gelu_derivative(xr[c] + b[c]);
    dxr[c] = g;
    acc[c] += g;
  }
}

template <typename T>
void bias_gelu_forward(const T* x, const float* b, T* y, int64_t rows, int64_t hidden) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(hidden, 1)), [&](int64_t r0, int64_t r1) {
    Rows<T> io(hidden, 1);
    for (int64_t r = r0; r < r1; ++r) {
      float* yr = io.out(y + r * hidden);
      gelu_row(io.load(x + r * hidden, 0), b, yr, hidden);
      io.store(yr, y + r * hidden);
    }
  });
}

template <typename T>
void bias_gelu_backward(const T* dy, const T* x, const float* b, T* dx, float* db, int64_t rows, int64_t hidden) {
  const int64_t blocks = (rows + kBlock - 1) / kBlock;
  std::vector<float> partial(static_cast<size_t>(blocks * hidden), 0.0f);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(kBlock * hidden, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t k0, int64_t k1) {
    Rows<T> io(hidden, 2);
    for (int64_t blk = k0; blk < k1; ++blk) {
      float* acc = partial.data() + blk * hidden;
      for (int64_t r = blk * kBlock; r < std::min(rows, (blk + 1) * kBlock); ++r) {
        float* dxr = io.out(dx + r * hidden);
        gelu_grad_row(io.load(dy + r * hidden, 0), io.load(x + r * hidden, 1), b, dxr, acc, hidden);
        io.store(dxr, dx + r * hidden);
      }
    }
  });
  // Across blocks in double, in block order: as accurate as PyTorch's reduction, and deterministic.
  for (int64_t c = 0; c < hidden; ++c) {
    double total = 0.0;
    for (int64_t blk = 0; blk < blocks; ++blk) total += partial[static_cast<size_t>(blk * hidden + c)];
    db[c] = static_cast<float>(total);
  }
}

int64_t rows_of(const at::Tensor& x, int64_t hidden) { return hidden == 0 ? 0 : x.numel() / hidden; }

at::Tensor bias_or_zeros(const std::optional<at::Tensor>& bias, int64_t hidden) {
  return bias ? parameter(*bias, hidden, "bias") : at::zeros({hidden}, at::kFloat);
}

at::Tensor bias_gelu_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "bertfast::bias_gelu: x must have a last (hidden) dimension");
  const int64_t hidden = x.size(-1);
  const at::Tensor b = bias_or_zeros(bias, hidden);
  return dispatch_float_bf16(x.scalar_type(), "bias_gelu", [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor xc = activation(x, x.scalar_type(), "x");
    at::Tensor y = at::empty(x.sizes(), x.options());
    bias_gelu_forward<T>(data_of<T>(xc), b.const_data_ptr<float>(), mutable_data_of<T>(y), rows_of(x, hidden),
                         hidden);
    return y;
  });
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                          const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && dy.sizes() == x.sizes(), "bertfast::bias_gelu_backward: dy ", dy.sizes(),
                    " and x ", x.sizes(), " differ in shape");
  const int64_t hidden = x.size(-1);
  const at::Tensor b = bias_or_zeros(bias, hidden);
  return dispatch_float_bf16(x.scalar_type(), "bias_gelu_backward", [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor xc = activation(x, x.scalar_type(), "x"), dyc = activation(dy, x.scalar_type(), "dy");
    at::Tensor dx = at::empty(x.sizes(), x.options());
    at::Tensor db = at::empty({hidden}, x.options().dtype(at::kFloat));
    bias_gelu_backward<T>(data_of<T>(dyc), data_of<T>(xc), b.const_data_ptr<float>(), mutable_data_of<T>(dx),
                          db.mutable_data_ptr<float>(), rows_of(x, hidden), hidden);
    return std::make_tuple(dx, bias ? db.to(bias->scalar_type()) : db);
  });
}

}  // namespace

}  // namespace bertfast

TORCH_LIBRARY_IMPL(bertfast, CPU, m) {
  m.impl("bias_gelu", &bertfast::bias_gelu_cpu);
  m.impl("bias_gelu_backward", &bertfast::bias_gelu_backward_cpu);
}
