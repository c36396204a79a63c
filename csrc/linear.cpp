// Inference on prepacked weights, on the CPU: bertfast::linear (one dense layer) and bertfast::encoder_layer (a
// whole BERT encoder layer in one call, so that no Python runs between its ops).
//
// The weights come prepacked, once, by Python (bertfast.prepacked): into oneDNN's blocked layout for the
// precision. float32 and bf16 run oneDNN's matmul with the bias and the GELU as its post-ops
// (mkldnn::_linear_pointwise). int8 quantizes the activations here, each row (token) with its own symmetric
// scale, rounds to the nearest (even) integer in [-127, 127] and shifts by the zero point 128 to uint8, runs
// oneDNN's u8 x s8 -> s32 matmul on the prepacked int8 weight (onednn::qlinear_pointwise, which applies the
// per-output-channel weight scale), then applies the row scale, the bias and the GELU in one pass over the
// output. The product is exact as long as the weight's levels are within what the CPU's int8 instructions
// sum without saturating: bertfast.prepacked picks them (127 with VNNI or AMX, 64 on AVX2, whose
// vpmaddubsw saturates a pair of u8 x s8 products at 16 bits).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "fast_math.h"
#include "gelu_math.h"
#include "op_utils.h"

namespace bertfast {

namespace {

constexpr float kLevels = 127.0f;  // the activations' int8 range: [-127, 127]
constexpr int64_t kZeroPoint = 128;

// One row of x as uint8 (round(x / s) + 128) and its scale s = max|x| / 127.
BERTFAST_CLONES
float quantize_row(const float* x, uint8_t* q, int64_t n) {
  float amax = 0.0f;
#pragma omp simd reduction(max : amax)
  for (int64_t c = 0; c < n; ++c) amax = std::max(amax, std::fabs(x[c]));
  const float scale = std::max(amax, 1e-12f) / kLevels;
  const float inverse = 1.0f / scale;
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) q[c] = static_cast<uint8_t>(std::nearbyint(x[c] * inverse) + kZeroPoint);
  return scale;
}

// y = acc * scale + bias over one row, then the exact GELU when asked.
BERTFAST_CLONES
void dequantize_row(const float* acc, float scale, const float* bias, bool exact_gelu, float* y, int64_t n) {
  if (exact_gelu) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) y[c] = gelu(acc[c] * scale + bias[c]);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) y[c] = acc[c] * scale + bias[c];
  }
}

template <typename T>
void quantize_rows(const T* x, uint8_t* q, float* scales, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    Rows<T> io(n, 1);
    for (int64_t r = r0; r < r1; ++r) scales[r] = quantize_row(io.load(x + r * n, 0), q + r * n, n);
  });
}

template <typename T>
void dequantize_rows(const float* acc, const float* scales, const float* bias, bool exact_gelu, T* y, int64_t rows,
                     int64_t n) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    Rows<T> io(n, 0);
    for (int64_t r = r0; r < r1; ++r) {
      float* yr = io.out(y + r * n);
      dequantize_row(acc + r * n, scales[r], bias, exact_gelu, yr, n);
      io.store(yr, y + r * n);
    }
  });
}

void check_activation_name(const std::string& act) {
  TORCH_CHECK_VALUE(act == "none" || act == "gelu" || act == "gelu_tanh",
                    "bertfast::linear: activation must be 'none', 'gelu' or 'gelu_tanh', got '", act, "'");
}

at::Tensor float_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::string& act) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               std::string_view, c10::List<std::optional<at::Scalar>>,
                                               std::optional<std::string_view>)>();
  const bool gelu = act != "none";
  return op.call(x, weight, bias, gelu ? "gelu" : "none", c10::List<std::optional<at::Scalar>>(),
                 gelu ? std::optional<std::string_view>(act == "gelu" ? "none" : "tanh") : std::nullopt);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                       const std::optional<at::Tensor>& bias, const std::string& act) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("onednn::qlinear_pointwise", "")
          .typed<at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>,
                            double, int64_t, std::optional<at::ScalarType>, std::string_view,
                            c10::List<std::optional<at::Scalar>>, std::string_view)>();
  const int64_t rows = x.size(0), k = x.size(1), n = weight_scale.size(0);
  TORCH_CHECK_VALUE(weight.size(0) == k && weight.size(1) == n, "bertfast::linear: the int8 weight is ",
                    weight.sizes(), ", expected (", k, ", ", n, ") for x ", x.sizes(), " and ", n, " scales");
  const at::Tensor b = bias ? parameter(*bias, n, "bias") : at::zeros({n}, at::kFloat);
  const at::Tensor scales = parameter(weight_scale, n, "weight_scale");
  return dispatch_float_bf16(x.scalar_type(), "linear", [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor xc = activation(x, x.scalar_type(), "x");
    at::Tensor q = at::empty({rows, k}, x.options().dtype(at::kByte));
    at::Tensor row_scales = at::empty({rows}, x.options().dtype(at::kFloat));
    quantize_rows<T>(data_of<T>(xc), q.mutable_data_ptr<uint8_t>(), row_scales.mutable_data_ptr<float>(), rows, k);
    const at::Tensor acc = op.call(q, 1.0, kZeroPoint, weight, scales, at::zeros({n}, at::kLong), std::nullopt, 1.0,
                                   0, at::kFloat, "none", c10::List<std::optional<at::Scalar>>(), "");
    at::Tensor y = at::empty({rows, n}, x.options());
    dequantize_rows<T>(acc.const_data_ptr<float>(), row_scales.const_data_ptr<float>(), b.const_data_ptr<float>(),
                       act == "gelu", mutable_data_of<T>(y), rows, n);
    if (act == "gelu_tanh") y = at::gelu(y, "tanh");
    return y;
  });
}

// x (rows, in) -> (rows, out): x W^T + bias, then the activation ("none", "gelu" exact, "gelu_tanh").
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& weight_scale,
                      const std::optional<at::Tensor>& bias, const std::string& act) {
  check_cpu(x, "x");
  check_activation_name(act);
  TORCH_CHECK_VALUE(x.dim() == 2, "bertfast::linear takes (rows, features) activations, got ", x.sizes());
  TORCH_CHECK_VALUE(weight.is_mkldnn(), "bertfast::linear takes a prepacked weight (bertfast.prepacked), got a ",
                    weight.layout(), " tensor");
  if (weight.scalar_type() == at::kChar) {
    TORCH_CHECK_VALUE(weight_scale.has_value(), "bertfast::linear: an int8 weight needs its weight_scale");
    return int8_linear(x, weight, *weight_scale, bias, act);
  }
  TORCH_CHECK_VALUE(!weight_scale.has_value(), "bertfast::linear: weight_scale is for int8 weights, got a ",
                    weight.scalar_type(), " weight");
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), "bertfast::linear: the weight is ", weight.scalar_type(),
                    " and x ", x.scalar_type());
  return float_linear(x.contiguous(), weight, bias, act);
}

// The vectors of encoder_layer, in this order.
enum Vector { kQkvBias, kAttentionOutBias, kNorm1Weight, kNorm1Bias, kUpBias, kDownBias, kNorm2Weight, kNorm2Bias };
constexpr size_t kVectors = 8;
constexpr size_t kWeights = 4;  // qkv, attention output, up (intermediate), down (output)

at::Tensor encoder_layer_cpu(const at::Tensor& hidden, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                             const std::vector<at::Tensor>& weights,
                             const c10::List<std::optional<at::Tensor>>& weight_scales,
                             const std::vector<at::Tensor>& vectors, int64_t heads, double scale,
                             const std::vector<double>& eps, const std::string& act,
                             const std::optional<at::Tensor>& attention_bias,
                             const std::optional<at::Tensor>& pos_key, const std::optional<at::Tensor>& pos_query,
                             const std::optional<at::Tensor>& pos_index) {
  TORCH_CHECK_VALUE(weights.size() == kWeights && weight_scales.size() == kWeights && vectors.size() == kVectors &&
                        eps.size() == 2,
                    "bertfast::encoder_layer takes 4 weights, 4 weight scales, 8 vectors and 2 epsilons, got ",
                    weights.size(), ", ", weight_scales.size(), ", ", vectors.size(), " and ", eps.size());
  TORCH_CHECK_VALUE(hidden.dim() == 2 && heads > 0 && hidden.size(1) % heads == 0,
                    "bertfast::encoder_layer: hidden must be (tokens, heads * head_dim) for ", heads, " heads, got ",
                    hidden.sizes());
  static const auto attention =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bertfast::attention", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, double, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, double, std::optional<int64_t>,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  static const auto add_layernorm =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bertfast::add_layernorm", "")
          .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double)>();
  const int64_t tokens = hidden.size(0), width = hidden.size(1);
  const auto dense = [&](const at::Tensor& x, size_t i, Vector bias, const std::string& a) {
    return linear_cpu(x, weights[i], weight_scales.get(i), vectors[bias], a);
  };
  const at::Tensor qkv = dense(hidden, 0, kQkvBias, "none");
  TORCH_CHECK_VALUE(qkv.size(1) == 3 * width, "bertfast::encoder_layer: the qkv weight gives ", qkv.size(1),
                    " features, expected 3 x ", width);
  const at::Tensor context = attention.call(qkv.view({tokens, 3, heads, width / heads}), cu_seqlens,
                                            c10::SymInt(max_seqlen), scale, attention_bias, std::nullopt, 0.0,
                                            std::nullopt, std::nullopt, pos_key, pos_query, pos_index);
  const at::Tensor attended =
      add_layernorm.call(dense(context.view({tokens, width}), 1, kAttentionOutBias, "none"), std::nullopt, hidden,
                         vectors[kNorm1Weight], vectors[kNorm1Bias], eps[0]);
  const at::Tensor up = dense(attended, 2, kUpBias, act);
  return add_layernorm.call(dense(up, 3, kDownBias, "none"), std::nullopt, attended, vectors[kNorm2Weight],
                            vectors[kNorm2Bias], eps[1]);
}

}  // namespace

}  // namespace bertfast

// A prepacked weight is an opaque oneDNN tensor (MkldnnCPU), which outranks the CPU key of the activations.
TORCH_LIBRARY_IMPL(bertfast, CPU, m) {
  m.impl("linear", &bertfast::linear_cpu);
  m.impl("encoder_layer", &bertfast::encoder_layer_cpu);
}
TORCH_LIBRARY_IMPL(bertfast, MkldnnCPU, m) {
  m.impl("linear", &bertfast::linear_cpu);
  m.impl("encoder_layer", &bertfast::encoder_layer_cpu);
}
