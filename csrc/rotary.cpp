// Rotary position embeddings on packed qkv, on the CPU: bertfast::rotary.
//
// qkv (T, 3, heads, head_dim) float32 or bf16; positions (T,) integers; inv_freq (head_dim / 2,). For token t
// and frequency f < half = head_dim / 2, the angle is positions[t] * inv_freq[f] (float32, as PyTorch
// multiplies them); cos and sin are rounded to qkv's dtype (transformers' convention), then q and k of every
// head turn by it in float32:
//   out[f] = x[f] cos - x[f + half] sin,  out[f + half] = x[f + half] cos + x[f] sin,
// and v is copied. With inverse the turn is by minus the angle: that is the gradient (a rotation's
// transpose), so backward is this op on dy. One token per task; the angles are shared by its 2 x heads rows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "op_utils.h"

namespace bertfast {

namespace {

BERTFAST_CLONES
void turn_row(const float* x, float* y, const float* c, const float* s, int64_t half) {
#pragma omp simd
  for (int64_t f = 0; f < half; ++f) {
    const float a = x[f], b = x[f + half];
    y[f] = a * c[f] - b * s[f];
    y[f + half] = b * c[f] + a * s[f];
  }
}

template <typename T>
void rotate(const T* qkv, const int64_t* positions, const float* inv_freq, T* out, int64_t tokens, int64_t heads,
            int64_t head_dim, bool inverse) {
  const int64_t half = head_dim / 2, token_size = 3 * heads * head_dim;
  at::parallel_for(0, tokens, std::max<int64_t>(1, 4096 / std::max<int64_t>(token_size, 1)), [&](int64_t t0, int64_t t1) {
    std::vector<float> c(static_cast<size_t>(half)), s(static_cast<size_t>(half));
    Rows<T> io(head_dim, 1);
    for (int64_t t = t0; t < t1; ++t) {
      const float position = static_cast<float>(positions[t]);
      for (int64_t f = 0; f < half; ++f) {
        const float angle = position * inv_freq[f];
        c[f] = to_float(from_float<T>(std::cos(angle)));
        const float sin = to_float(from_float<T>(std::sin(angle)));
        s[f] = inverse ? -sin : sin;
      }
      const T* src = qkv + t * token_size;
      T* dst = out + t * token_size;
      for (int64_t row = 0; row < 2 * heads; ++row) {  // q's heads, then k's
        float* y = io.out(dst + row * head_dim);
        turn_row(io.load(src + row * head_dim, 0), y, c.data(), s.data(), half);
        io.store(y, dst + row * head_dim);
      }
      std::copy(src + 2 * heads * head_dim, src + token_size, dst + 2 * heads * head_dim);  // v
    }
  });
}

at::Tensor rotary_cpu(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& inv_freq, bool inverse) {
  TORCH_CHECK_VALUE(qkv.dim() == 4 && qkv.size(1) == 3 && qkv.size(3) % 2 == 0,
                    "qkv must be (tokens, 3, heads, even head_dim), got ", qkv.sizes());
  const int64_t tokens = qkv.size(0), heads = qkv.size(2), head_dim = qkv.size(3);
  check_cpu(positions, "positions");
  TORCH_CHECK_VALUE(positions.dim() == 1 && positions.size(0) == tokens && !positions.is_floating_point(),
                    "positions must be (", tokens, ",) integers, got ", positions.sizes(), " ", positions.scalar_type());
  check_cpu(inv_freq, "inv_freq");
  TORCH_CHECK_VALUE(inv_freq.dim() == 1 && inv_freq.size(0) == head_dim / 2, "inv_freq must be (", head_dim / 2,
                    ",), got ", inv_freq.sizes());
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const at::Tensor freq = inv_freq.to(at::kFloat).contiguous();
  return dispatch_float_bf16(qkv.scalar_type(), "rotary", [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor x = activation(qkv, qkv.scalar_type(), "qkv");
    at::Tensor out = at::empty_like(x);
    rotate<T>(data_of<T>(x), pos.const_data_ptr<int64_t>(), freq.const_data_ptr<float>(), mutable_data_of<T>(out),
              tokens, heads, head_dim, inverse);
    return out;
  });
}

}  // namespace

}  // namespace bertfast

TORCH_LIBRARY_IMPL(bertfast, CPU, m) { m.impl("rotary", &bertfast::rotary_cpu); }
