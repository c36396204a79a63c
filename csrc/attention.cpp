// Bidirectional attention on packed short sequences, forward only (inference), on the CPU.
//
// qkv is (T, 3, heads, head_dim) row-major float32: the packed tokens of all sequences, sequence b
// being tokens [cu[b], cu[b + 1]). Each sequence attends only to itself:
//   out[t, h] = sum_j softmax_j(scale * q[t, h] . k[j, h]) v[j, h],  j over t's sequence,
// written as (T, heads, head_dim). One (sequence, head) pair is one task; its K is transposed into a
// (head_dim, keys) buffer and V copied into a (len, dims) one, both zero-padded to whole register
// tiles, so that scores and outputs are computed a tile at a time in registers, with no remainder
// loops; queries go in blocks of kBlock so that each K and V element loaded serves kBlock of them. Softmax is exact (row
// max subtracted, fp32), with the branch-free exp. The per-head function is compiled per instruction
// set (BERTFAST_CLONES).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fast_math.h"
#include "ops.h"

namespace bertfast {

namespace {

constexpr int kBlock = 8;   // queries per block
constexpr int64_t kLanes = 16;  // keys (and head-dim columns) per register tile

inline int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// Per (sequence, head) buffers: a block of queries, K^T (head_dim, keys) and V (len, dims) zero-padded to whole tiles,
// and kBlock rows of scores.
struct Scratch {
  float* q;  // (head_dim, kBlock): a block's scaled queries, transposed
  float* kt;
  float* v;
  float* s;
  int64_t keys;  // round_up(len): the row stride of kt and s
  int64_t dims;  // round_up(head_dim): the row stride of v
};

// Queries [i0, i0 + R) of one (sequence, head). Each tile of kLanes scores (or output columns) stays in
// registers across the whole reduction, for all R queries at once.
template <int R>
BERTFAST_INLINE void attend_block(const float* qkv, float* out, int64_t start, int64_t len, int64_t i0, int64_t h,
                                  int64_t heads, int64_t head_dim, float scale, const Scratch& w) {
  const int64_t token_stride = 3 * heads * head_dim;
  for (int r = 0; r < R; ++r) {
    const float* q = qkv + (start + i0 + r) * token_stride + h * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) w.q[d * R + r] = q[d] * scale;
  }
  for (int64_t j0 = 0; j0 < w.keys; j0 += kLanes) {
    float acc[R][kLanes] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      const float* k = w.kt + d * w.keys + j0;
      for (int r = 0; r < R; ++r) {
        const float qd = w.q[d * R + r];
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
    float m = sr[0];
    for (int64_t j = 1; j < len; ++j) m = std::max(m, sr[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < len; ++j) {
      const float e = fast_exp_nonpositive(sr[j] - m);
      sr[j] = e;
      sum += e;
    }
    inv_sum[r] = 1.0f / sum;
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
      float* o = out + ((start + i0 + r) * heads + h) * head_dim + d0;
      for (int64_t c = 0; c < columns; ++c) o[c] = acc[r][c] * inv_sum[r];
    }
  }
}

BERTFAST_CLONES
void attend_head(const float* qkv, float* out, int64_t start, int64_t len, int64_t h, int64_t heads,
                 int64_t head_dim, float scale, Scratch w) {
  const int64_t token_stride = 3 * heads * head_dim;
  w.keys = round_up(len);
  std::fill(w.kt, w.kt + head_dim * w.keys, 0.0f);
  std::fill(w.v, w.v + len * w.dims, 0.0f);
  const float* k0 = qkv + start * token_stride + (heads + h) * head_dim;
  const float* v0 = qkv + start * token_stride + (2 * heads + h) * head_dim;
  for (int64_t j = 0; j < len; ++j) {
    const float* kj = k0 + j * token_stride;
    for (int64_t d = 0; d < head_dim; ++d) w.kt[d * w.keys + j] = kj[d];
    std::copy(v0 + j * token_stride, v0 + j * token_stride + head_dim, w.v + j * w.dims);
  }
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) attend_block<kBlock>(qkv, out, start, len, i, h, heads, head_dim, scale, w);
  if (i + kBlock / 2 <= len) {
    attend_block<kBlock / 2>(qkv, out, start, len, i, h, heads, head_dim, scale, w);
    i += kBlock / 2;
  }
  for (; i < len; ++i) attend_block<1>(qkv, out, start, len, i, h, heads, head_dim, scale, w);
}

}  // namespace

void packed_attention_forward(const float* qkv, const int32_t* cu_seqlens, float* out, int64_t batch,
                              int64_t heads, int64_t head_dim, int64_t longest, float scale) {
  const int64_t tasks = batch * heads;
  // Few, cheap tasks (a short query) are not worth waking the other threads for.
  const int64_t work = static_cast<int64_t>(cu_seqlens[batch]) * longest * heads * head_dim;
#pragma omp parallel if (work > 65536 && tasks > 1)
  {
    const int64_t keys = round_up(longest), dims = round_up(head_dim);
    std::vector<float> q(static_cast<size_t>(head_dim * kBlock)), kt(static_cast<size_t>(head_dim * keys)),
        v(static_cast<size_t>(keys * dims)), s(static_cast<size_t>(kBlock * keys));
    const Scratch scratch{q.data(), kt.data(), v.data(), s.data(), keys, dims};
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / heads;
      const int64_t h = task % heads;
      const int64_t start = cu_seqlens[b];
      const int64_t len = cu_seqlens[b + 1] - start;
      if (len > 0) attend_head(qkv, out, start, len, h, heads, head_dim, scale, scratch);
    }
  }
}

}  // namespace bertfast
