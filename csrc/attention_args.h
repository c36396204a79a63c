// The arguments of the packed-attention ops (attention.cpp, attention_train.cpp), checked once: qkv
// (T, 3, heads, head_dim), cu_seqlens (batch + 1) offsets from 0 to T, max_seqlen at least the longest
// sequence, the optional score bias laid out by key - query distance, (heads, 2 * max_seqlen - 1) float32, and the
// optional columns: each token's place in its padded row, from which distances are counted (for the bias and
// the window) when a row's tokens are not one run (an attention mask with holes); increasing along each
// sequence and spanning less than max_seqlen. And DeBERTa's disentangled terms: pos_key and pos_query, the
// relative-position embeddings' key and query projections (positions, heads, head_dim) float32, either or both, and
// pos_index (2 * max_seqlen - 1) integers, the row of those tables for each key - query distance.
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
  at::Tensor pos_key, pos_query;  // float32 (positions, heads, head_dim) contiguous, or undefined
  at::Tensor pos_index;  // int64 (2 * max_seqlen - 1) contiguous, or undefined (no disentangled terms)
  int64_t total, heads, head_dim, batch, longest;
  int64_t positions = 0;

  const int32_t* offsets() const { return cu.const_data_ptr<int32_t>(); }
  const float* bias_data() const { return bias.defined() ? bias.const_data_ptr<float>() : nullptr; }
  const int64_t* columns_data() const { return columns.defined() ? columns.const_data_ptr<int64_t>() : nullptr; }
  bool disentangled() const { return pos_index.defined(); }
};

inline at::Tensor position_table(const std::optional<at::Tensor>& t, const PackedAttentionArgs& a, const char* name) {
  if (!t.has_value()) return at::Tensor();
  check_cpu(*t, name);
  TORCH_CHECK_VALUE(t->dim() == 3 && t->size(1) == a.heads && t->size(2) == a.head_dim, name,
                    " must be (positions, heads, head_dim) = (positions, ", a.heads, ", ", a.head_dim, "), got ",
                    t->sizes());
  TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
  return t->contiguous();
}

// DeBERTa's disentangled terms, checked: pos_index's rows must exist in the tables.
inline void check_disentangled(PackedAttentionArgs& a, int64_t max_seqlen, const std::optional<at::Tensor>& pos_key,
                               const std::optional<at::Tensor>& pos_query, const std::optional<at::Tensor>& pos_index) {
  a.pos_key = position_table(pos_key, a, "pos_key");
  a.pos_query = position_table(pos_query, a, "pos_query");
  const bool tables = a.pos_key.defined() || a.pos_query.defined();
  TORCH_CHECK_VALUE(tables == pos_index.has_value(),
                    "pos_index and at least one of pos_key and pos_query come together (the disentangled terms)");
  if (!tables) return;
  TORCH_CHECK_VALUE(!a.pos_key.defined() || !a.pos_query.defined() || a.pos_key.size(0) == a.pos_query.size(0),
                    "pos_key and pos_query must have as many positions, got ", a.pos_key.size(0), " and ",
                    a.pos_query.size(0));
  a.positions = (a.pos_key.defined() ? a.pos_key : a.pos_query).size(0);
  check_cpu(*pos_index, "pos_index");
  const int64_t distances = std::max<int64_t>(2 * max_seqlen - 1, 1);
  TORCH_CHECK_VALUE(pos_index->dim() == 1 && pos_index->size(0) == distances && !pos_index->is_floating_point(),
                    "pos_index must be (2 * max_seqlen - 1,) = (", distances, ",) integers, got ", pos_index->sizes());
  a.pos_index = pos_index->to(at::kLong).contiguous();
  const int64_t* index = a.pos_index.const_data_ptr<int64_t>();
  for (int64_t d = 0; d < distances; ++d) {
    TORCH_CHECK_VALUE(index[d] >= 0 && index[d] < a.positions, "pos_index holds ", index[d], ", outside the ",
                      a.positions, " positions of the tables");
  }
}

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
