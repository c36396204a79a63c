// Sentence-embedding pooling of packed sequences on the CPU, optionally L2-normalised:
// bertfast::pooling (differentiable), bertfast::pooling_forward and bertfast::pooling_backward.
//
//   forward , sequence b = rows [s, e) of hidden (T, H):  mean: p = sum(h[s:e]) / max(e - s, 1);  cls: p = h[s]
//            (zeros for an empty sequence); normalize: y = p / max(|p|, eps), else y = p
//   backward: normalize: dp = (dy - y <y, dy>) / |p| where |p| >= eps, else dy / eps (F.normalize's gradient);
//            mean: dh[s:e] = dp / (e - s);  cls: dh[s] = dp, zeros elsewhere
//
// Sums and norms in float32; hidden and dy float32 or bf16, y and dh in hidden's dtype, p (the pooled vectors
// before normalisation, kept for the backward) float32. Sequences are split across torch's threads; every row
// of dh belongs to one sequence (cu_seqlens starts at 0 and ends at T), so the backward writes each row once.
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "op_utils.h"

namespace bertfast {

namespace {

constexpr float kNormalizeEps = 1e-12f;  // F.normalize's

bool is_mean(const std::string& mode) {
  TORCH_CHECK_VALUE(mode == "mean" || mode == "cls", "bertfast::pooling: mode must be 'mean' or 'cls', got '", mode,
                    "'");
  return mode == "mean";
}

float norm_of(const float* p, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += p[c] * p[c];
  return std::sqrt(sum);
}

template <typename T>
void forward_kernel(const T* h, const int32_t* cu, T* y, float* pooled, int64_t batch, int64_t n, bool mean,
                    bool normalize) {
  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    Rows<T> io(n, 1);
    std::vector<float> p(static_cast<size_t>(n));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = cu[b], e = cu[b + 1];
      std::fill(p.begin(), p.end(), 0.0f);
      for (int64_t r = s; r < (mean ? e : std::min(e, s + 1)); ++r) {
        const float* row = io.load(h + r * n, 0);
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) p[c] += row[c];
      }
      if (mean && e > s) {
        const float count = static_cast<float>(e - s);
        for (int64_t c = 0; c < n; ++c) p[c] /= count;
      }
      float* out = io.out(y + b * n);
      if (normalize) {
        std::copy(p.begin(), p.end(), pooled + b * n);
        const float divisor = std::max(norm_of(p.data(), n), kNormalizeEps);
        for (int64_t c = 0; c < n; ++c) out[c] = p[c] / divisor;
      } else {
        std::copy(p.begin(), p.end(), out);
      }
      io.store(out, y + b * n);
    }
  });
}

template <typename T>
void backward_kernel(const T* dy, const float* pooled, const int32_t* cu, T* dh, int64_t batch, int64_t n, bool mean,
                     bool normalize) {
  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    Rows<T> io(n, 1);
    std::vector<float> dp(static_cast<size_t>(n)), zeros(static_cast<size_t>(n), 0.0f);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = cu[b], e = cu[b + 1];
      if (e == s) continue;
      const float* g = io.load(dy + b * n, 0);
      std::copy(g, g + n, dp.begin());
      if (normalize) {
        const float* p = pooled + b * n;
        const float norm = norm_of(p, n);
        if (norm >= kNormalizeEps) {
          float dot = 0.0f;
          for (int64_t c = 0; c < n; ++c) dot += p[c] / norm * dp[c];
          for (int64_t c = 0; c < n; ++c) dp[c] = (dp[c] - p[c] / norm * dot) / norm;
        } else {
          for (int64_t c = 0; c < n; ++c) dp[c] /= kNormalizeEps;
        }
      }
      if (mean) {
        const float count = static_cast<float>(e - s);
        for (int64_t c = 0; c < n; ++c) dp[c] /= count;
      }
      for (int64_t r = s; r < e; ++r) {
        float* out = io.out(dh + r * n);
        const float* values = (mean || r == s) ? dp.data() : zeros.data();
        std::copy(values, values + n, out);
        io.store(out, dh + r * n);
      }
    }
  });
}

at::Tensor offsets(const at::Tensor& cu_seqlens) {
  check_cpu(cu_seqlens, "cu_seqlens");
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
                    "bertfast::pooling: cu_seqlens must be 1-D with batch + 1 offsets, got ", cu_seqlens.sizes());
  return cu_seqlens.to(at::kInt).contiguous();
}

std::tuple<at::Tensor, at::Tensor> pooling_forward_cpu(const at::Tensor& hidden, const at::Tensor& cu_seqlens,
                                                       const std::string& mode, bool normalize) {
  TORCH_CHECK_VALUE(hidden.dim() == 2, "bertfast::pooling: hidden must be (tokens, hidden), got ", hidden.sizes());
  const bool mean = is_mean(mode);
  const at::Tensor cu = offsets(cu_seqlens);
  const int64_t batch = cu.numel() - 1, n = hidden.size(1);
  return dispatch_float_bf16(hidden.scalar_type(), "pooling", [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor hc = activation(hidden, hidden.scalar_type(), "hidden");
    at::Tensor y = at::empty({batch, n}, hidden.options());
    at::Tensor pooled = normalize ? at::empty({batch, n}, hidden.options().dtype(at::kFloat))
                                  : at::empty({0}, hidden.options().dtype(at::kFloat));
    forward_kernel<T>(data_of<T>(hc), cu.const_data_ptr<int32_t>(), mutable_data_of<T>(y),
                      pooled.mutable_data_ptr<float>(), batch, n, mean, normalize);
    return std::make_tuple(y, pooled);
  });
}

at::Tensor pooling_backward_cpu(const at::Tensor& dy, const at::Tensor& pooled, const at::Tensor& cu_seqlens,
                                c10::SymInt rows, const std::string& mode, bool normalize) {
  TORCH_CHECK_VALUE(dy.dim() == 2, "bertfast::pooling_backward: dy must be (batch, hidden), got ", dy.sizes());
  const bool mean = is_mean(mode);
  const at::Tensor cu = offsets(cu_seqlens);
  const int64_t batch = cu.numel() - 1, n = dy.size(1);
  TORCH_CHECK_VALUE(dy.size(0) == batch, "bertfast::pooling_backward: dy has ", dy.size(0), " rows for ", batch,
                    " sequences");
  return dispatch_float_bf16(dy.scalar_type(), "pooling_backward", [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor dyc = activation(dy, dy.scalar_type(), "dy");
    const at::Tensor p = normalize ? pooled.to(at::kFloat).contiguous() : pooled;
    at::Tensor dh = at::empty({rows.expect_int(), n}, dy.options());
    backward_kernel<T>(data_of<T>(dyc), p.const_data_ptr<float>(), cu.const_data_ptr<int32_t>(),
                       mutable_data_of<T>(dh), batch, n, mean, normalize);
    return dh;
  });
}

at::Tensor pooling_cpu(const at::Tensor& hidden, const at::Tensor& cu_seqlens, const std::string& mode,
                       bool normalize) {
  return std::get<0>(pooling_forward_cpu(hidden, cu_seqlens, mode, normalize));
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class Pooling : public torch::autograd::Function<Pooling> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& cu_seqlens,
                            const std::string& mode, bool normalize) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("bertfast::pooling_forward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                         c10::string_view, bool)>();
    auto [y, pooled] = op.call(hidden, cu_seqlens, mode, normalize);
    ctx->save_for_backward({pooled, cu_seqlens});
    ctx->saved_data["rows"] = hidden.sym_size(0);
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["normalize"] = normalize;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("bertfast::pooling_backward", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 c10::SymInt, c10::string_view, bool)>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor dh = op.call(grads[0], saved[0], saved[1], ctx->saved_data["rows"].toSymInt(),
                                  ctx->saved_data["mode"].toStringRef(), ctx->saved_data["normalize"].toBool());
    return {dh, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor pooling_autograd(const at::Tensor& hidden, const at::Tensor& cu_seqlens, c10::string_view mode,
                            bool normalize) {
  return Pooling::apply(hidden, cu_seqlens, std::string(mode), normalize);
}

}  // namespace

}  // namespace bertfast

TORCH_LIBRARY_FRAGMENT(bertfast, m) {
  // (batch, H) mean or first row ("cls") of each packed sequence of hidden (T, H), L2-normalised with normalize.
  m.def("pooling(Tensor hidden, Tensor cu_seqlens, str mode, bool normalize) -> Tensor");
  // (y, the float32 pooled vectors before normalisation: empty without it).
  m.def("pooling_forward(Tensor hidden, Tensor cu_seqlens, str mode, bool normalize) -> (Tensor, Tensor)");
  // The gradient of hidden, (rows, H), for dy (batch, H).
  m.def("pooling_backward(Tensor dy, Tensor pooled, Tensor cu_seqlens, SymInt rows, str mode, bool normalize) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(bertfast, CPU, m) {
  m.impl("pooling", [](const at::Tensor& hidden, const at::Tensor& cu, c10::string_view mode, bool normalize) {
    return bertfast::pooling_cpu(hidden, cu, std::string(mode), normalize);
  });
  m.impl("pooling_forward", [](const at::Tensor& hidden, const at::Tensor& cu, c10::string_view mode,
                               bool normalize) {
    return bertfast::pooling_forward_cpu(hidden, cu, std::string(mode), normalize);
  });
  m.impl("pooling_backward", [](const at::Tensor& dy, const at::Tensor& pooled, const at::Tensor& cu,
                                c10::SymInt rows, c10::string_view mode, bool normalize) {
    return bertfast::pooling_backward_cpu(dy, pooled, cu, std::move(rows), std::string(mode), normalize);
  });
}

TORCH_LIBRARY_IMPL(bertfast, Autograd, m) { m.impl("pooling", &bertfast::pooling_autograd); }
