// The arguments of the packed-attention ops (attention.cpp, attention_train.cpp), checked once: qkv
// (T, 3, heads, head_dim), cu_seqlens (batch + 1) offsets from 0 to T, max_seqlen at least the longest
// sequence, the optional score bias laid out by key - query distance, (heads, 2 * max_seqlen - 1) float32, and the
// optional columns: each token's place in its padded row, from which distances are counted (for the bias and
// the window) when a row's tokens are not one run (an attention mask with holes); increasing along each
// sequence and spanning less than max_seqlen.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "op_utils.h"

namespace bertfast {

struct PackedAttentionArgs {
  at::Tensor cu;    // int32, contiguous
  at::Tensor bias;  // float32 contiguous, or undefined
  at::Tensor columns;  // int64 contiguous, or undefined (a token's place is its index in its sequence)
  int64_t total, heads, head_dim, batch, longest;

  const int32_t* offsets() const { return cu.const_data_ptr<int32_t>(); }
  const float* bias_data() const { return bias.defined() ? bias.const_data_ptr<float>() : nullptr; }
  const int64_t* columns_data() const { return columns.defined() ? columns.const_data_ptr<int64_t>() : nullptr; }
};

inline PackedAttentionArgs check_packed_attention(const at::Tensor& qkv, const at::Tensor& cu_seqlens,
                                                  int64_t max_seqlen, const std::optional<at::Tensor>& bias,
                                                  const std::optional<at::Tensor>& columns = std::nullopt) {
  TORCH_CHECK_VALUE(qkv.dim() == 4 && qkv.size(1) == 3, "qkv must be (tokens, 3, heads, head_dim), got ",
                    qkv.sizes());
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, "cu_seqlens must be 1-D with batch + 1 offsets");
  check_cpu(cu_seqlens, "cu_seqlens");
  PackedAttentionArgs a;
  a.cu = cu_seqlens.to(at::kInt).contiguous();
  a.total = qkv.size(0);
  a.heads = qkv.size(2);
  a.head_dim = qkv.size(3);
  a.batch = a.cu.size(0) - 1;
  const int32_t* offsets = a.offsets();
  TORCH_CHECK_VALUE(offsets[0] == 0 && offsets[a.batch] == a.total,
                    "cu_seqlens must start at 0 and end at the token count ", a.total, ", got ", offsets[0], " and ",
                    offsets[a.batch]);
  a.longest = 0;
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t len = static_cast<int64_t>(offsets[b + 1]) - offsets[b];
    TORCH_CHECK_VALUE(len >= 0, "cu_seqlens must be nondecreasing");
    a.longest = std::max(a.longest, len);
  }
  TORCH_CHECK_VALUE(a.longest <= max_seqlen, "a sequence of ", a.longest, " tokens is longer than max_seqlen ",
                    max_seqlen);
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    const int64_t distances = std::max<int64_t>(2 * max_seqlen - 1, 1);
    TORCH_CHECK_VALUE(bias->dim() == 2 && bias->size(0) == a.heads && bias->size(1) == distances,
                      "bias must be (heads, 2 * max_seqlen - 1) = (", a.heads, ", ", distances, "), got ",
                      bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == at::kFloat, "bias must be float32, got ", bias->scalar_type());
    a.bias = bias->contiguous();
  }
  if (columns.has_value()) {
    check_cpu(*columns, "columns");
    TORCH_CHECK_VALUE(columns->dim() == 1 && columns->size(0) == a.total && !columns->is_floating_point(),
                      "columns must be (", a.total, ",) integers, got ", columns->sizes(), " ",
                      columns->scalar_type());
    a.columns = columns->to(at::kLong).contiguous();
    const int64_t* col = a.columns_data();
    for (int64_t b = 0; b < a.batch; ++b) {
      const int64_t start = offsets[b], end = offsets[b + 1];
      for (int64_t t = start + 1; t < end; ++t) {
        TORCH_CHECK_VALUE(col[t] > col[t - 1], "columns must increase along each sequence (sequence ", b, ")");
      }
      TORCH_CHECK_VALUE(end == start || col[end - 1] - col[start] < max_seqlen, "sequence ", b,
                        "'s columns span more than max_seqlen ", max_seqlen);
    }
  }
  return a;
}

}  // namespace bertfast
