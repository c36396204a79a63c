// Bidirectional attention on packed short sequences, on the CPU: bertfast::attention without dropout, window or
// columns (with any of them, and in training, the kernels of attention_train.cpp run).
//
// qkv is (T, 3, heads, head_dim) row-major float32 or bf16: the packed tokens of all sequences, sequence b
// being tokens [cu[b], cu[b + 1]). Each sequence attends only to itself:
//   out[t, h] = sum_j softmax_j(scale * q[t, h] . k[j, h] [+ bias[h, j - i]]) v[j, h],  j over t's sequence,
// written as (T, heads, head_dim), i and j being the query's and the key's positions in the sequence. The
// optional bias (MPNet's relative-position bias) comes laid out by distance, (heads, 2 * max_seqlen - 1) float32
// with distance j - i at column j - i + max_seqlen - 1: bucketing it is Python's (bertfast.common), once a call. One (sequence, head) pair is one task. Its scaled queries and its K are
// staged transposed, (head_dim, keys), and V as (len, dims), in float32, zero-padded to whole register tiles,
// so that scores and outputs are computed a tile at a time in registers, with no remainder loops; queries go
// in blocks of kBlock so that each K and V element loaded serves kBlock of them. Softmax is exact (row max
// subtracted, fp32), with the branch-free exp. The per-head function is compiled per instruction set
// (BERTFAST_CLONES); staging converts bf16 once, so the arithmetic is float32 for both dtypes.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "attention_args.h"
#include "fast_math.h"
#include "op_utils.h"

namespace bertfast {

namespace {

constexpr int kBlock = 8;       // queries per block
constexpr int64_t kLanes = 16;  // keys (and head-dim columns) per register tile

inline int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// Per (sequence, head) float32 buffers: the scaled queries transposed, (head_dim, keys); K^T (head_dim, keys)
// and V (keys, dims) zero-padded to whole tiles; kBlock rows of scores; the output rows (len, head_dim).
struct Scratch {
  float* q;
  float* kt;
  float* v;
  float* s;
  float* o;
  const float* bias;  // this head's score bias at key - query distance 0 (indexed by j - i), or null
  int64_t keys;  // round_up(len): the row stride of q, kt and s
  int64_t dims;  // round_up(head_dim): the row stride of v
};

// Queries [i0, i0 + R) of one (sequence, head). Each tile of kLanes scores (or output columns) stays in
// registers across the whole reduction, for all R queries at once.
template <int R>
BERTFAST_INLINE void attend_block(int64_t len, int64_t i0, int64_t head_dim, const Scratch& w) {
  for (int64_t j0 = 0; j0 < w.keys; j0 += kLanes) {
    float acc[R][kLanes] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      const float* k = w.kt + d * w.keys + j0;
      for (int r = 0; r < R; ++r) {
        const float qd = w.q[d * w.keys + i0 + r];
#pragma omp simd
        for (int64_t c = 0; c < kLanes; ++c) acc[r][c] += qd * k[c];
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int64_t c = 0; c < kLanes; ++c) w.s[r * w.keys + j0 + c] = acc[r][c];
    }
  }
  float inv_sum[R];
  for (int r = 0; r < R; ++r) {
    float* sr = w.s + r * w.keys;
    if (w.bias != nullptr) {
      const float* br = w.bias - (i0 + r);
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) sr[j] += br[j];
    }
    float m;
    inv_sum[r] = 1.0f / exponentiate_row(sr, len, m);
  }
  for (int64_t d0 = 0; d0 < w.dims; d0 += kLanes) {
    float acc[R][kLanes] = {};
    for (int64_t j = 0; j < len; ++j) {
      const float* v = w.v + j * w.dims + d0;
      for (int r = 0; r < R; ++r) {
        const float p = w.s[r * w.keys + j];
#pragma omp simd
        for (int64_t c = 0; c < kLanes; ++c) acc[r][c] += p * v[c];
      }
    }
    const int64_t columns = std::min(kLanes, head_dim - d0);
    for (int r = 0; r < R; ++r) {
      float* o = w.o + (i0 + r) * head_dim + d0;
      for (int64_t c = 0; c < columns; ++c) o[c] = acc[r][c] * inv_sum[r];
    }
  }
}

// The staged (sequence, head) of `len` tokens: w.o = its attention output rows.
BERTFAST_CLONES
void attend_head(int64_t len, int64_t head_dim, Scratch w) {
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) attend_block<kBlock>(len, i, head_dim, w);
  if (i + kBlock / 2 <= len) {
    attend_block<kBlock / 2>(len, i, head_dim, w);
    i += kBlock / 2;
  }
  for (; i < len; ++i) attend_block<1>(len, i, head_dim, w);
}

template <typename T>
void packed_attention(const T* qkv, const int32_t* cu, T* out, int64_t batch, int64_t heads, int64_t head_dim,
                      int64_t longest, float scale, const float* bias, int64_t max_seqlen) {
  const int64_t tasks = batch * heads;
  const int64_t token_stride = 3 * heads * head_dim;
  // Few, cheap tasks (a short query) are not worth waking the other threads for.
  const int64_t work = static_cast<int64_t>(cu[batch]) * longest * heads * head_dim;
  at::parallel_for(0, tasks, work > 65536 ? 1 : tasks, [&](int64_t t0, int64_t t1) {
    const int64_t keys = round_up(longest), dims = round_up(head_dim);
    std::vector<float> q(head_dim * keys), kt(head_dim * keys), v(keys * dims), s(kBlock * keys),
        o(longest * head_dim);
    Scratch w{q.data(), kt.data(), v.data(), s.data(), o.data(), nullptr, keys, dims};
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const int64_t start = cu[b], len = cu[b + 1] - start;
      if (len == 0) continue;
      w.keys = round_up(len);
      if (bias != nullptr) w.bias = bias + h * (2 * max_seqlen - 1) + (max_seqlen - 1);
      std::fill(w.kt, w.kt + head_dim * w.keys, 0.0f);
      std::fill(w.v, w.v + len * w.dims, 0.0f);
      const T* q0 = qkv + start * token_stride + h * head_dim;
      const T* k0 = q0 + heads * head_dim;
      const T* v0 = k0 + heads * head_dim;
      for (int64_t j = 0; j < len; ++j) {
        for (int64_t d = 0; d < head_dim; ++d) {
          w.q[d * w.keys + j] = to_float(q0[j * token_stride + d]) * scale;
          w.kt[d * w.keys + j] = to_float(k0[j * token_stride + d]);
          w.v[j * w.dims + d] = to_float(v0[j * token_stride + d]);
        }
      }
      attend_head(len, head_dim, w);
      for (int64_t j = 0; j < len; ++j) {
        T* dst = out + ((start + j) * heads + h) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = from_float<T>(w.o[j * head_dim + d]);
      }
    }
  });
}

at::Tensor attention_cpu(const at::Tensor& qkv, const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& seed,
                         double dropout_p, std::optional<int64_t> window, const std::optional<at::Tensor>& columns,
                         const std::optional<at::Tensor>& pos_key, const std::optional<at::Tensor>& pos_query,
                         const std::optional<at::Tensor>& pos_index) {
  // The training kernel applies the mask, the window, the columns and the disentangled terms (attention_train.cpp).
  if (dropout_p != 0.0 || window || columns || pos_index) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("bertfast::attention_forward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, c10::SymInt, double,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
                                   std::optional<int64_t>, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&)>();
    return std::get<0>(op.call(qkv, cu_seqlens, c10::SymInt(max_seqlen), scale, bias, seed, dropout_p, window,
                               columns, pos_key, pos_query, pos_index));
  }
  TORCH_CHECK_VALUE(!pos_key && !pos_query, "pos_key and pos_query need pos_index (the disentangled terms)");
  const PackedAttentionArgs a = check_packed_attention(qkv, cu_seqlens, max_seqlen, bias);
  return dispatch_float_bf16(qkv.scalar_type(), "attention", [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor packed = activation(qkv, qkv.scalar_type(), "qkv");
    at::Tensor out = at::empty({a.total, a.heads, a.head_dim}, qkv.options());
    packed_attention<T>(data_of<T>(packed), a.offsets(), mutable_data_of<T>(out), a.batch, a.heads, a.head_dim,
                        a.longest, static_cast<float>(scale), a.bias_data(), max_seqlen);
    return out;
  });
}

}  // namespace

}  // namespace bertfast

TORCH_LIBRARY_IMPL(bertfast, CPU, m) { m.impl("attention", &bertfast::attention_cpu); }
