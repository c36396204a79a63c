// Training attention on packed sequences, on the CPU: bertfast::attention_forward (the output and each query
// row's log-sum-exp) and bertfast::attention_backward (dqkv and the score bias's gradient).
//
// The math is attention.cpp's, with dropout on the probabilities (the shared counter-hash mask of
// dropout_hash.h: row (token * heads + head) of the query, column the key's position in its sequence, as the
// reference's padded layout numbers them) and an optional window (query i sees keys |i - j| <= window);
// distances i - j count the tokens' columns in their padded rows where columns are given (a mask with holes):
//   S = scale Q K^T [+ bias],  P = softmax(S) = exp(S - lse),  O = (P * Z) V,  Z = keep ? 1 / (1 - p) : 0
// and backward, with D_i = dO_i . O_i = sum_j (P * Z)_ij (dO V^T)_ij (the latter, from the recomputed
// float32 probabilities: O is not needed, and a bf16-rounded O would put its rounding into every dS):
//   dV = (P * Z)^T dO,  dS = P * ((dO V^T) * Z - D),  dQ = scale dS K,  dK = scale dS^T Q,
//   dbias[h, j - i] = sum of dS[i, j] over the (i, j) at that distance, in every sequence.
// One (sequence, head) pair is one task, in float32, a block of kQueryBlock queries at a time: a block's
// scores cover only the keys it may see (its band, all keys without a window), in per-thread scratch, and
// the products are single-threaded sgemm calls of the BLAS that torch links (MKL or OpenBLAS). So a
// sequence costs its own length times what a query sees, never the batch's longest squared. Tasks are dealt
// out longest first, round robin over the threads, so that one long sequence among short ones does not
// leave a thread idle. The bias gradient is summed per sequence, then over the sequences in order:
// deterministic.
// DeBERTa's disentangled attention adds to S[i, j] the content-to-position and position-to-content terms
//   scale (q_i . Kr[c] + k_j . Qr[c]),  c = pos_index[place(j) - place(i)],
// from the task's own c2p = scale Q Kr^T and p2c = scale K Qr^T over just the rows of the position tables
// that its distances reach (never a (L, L) or per-batch tensor); backward scatters dS into dc2p / dp2c by
// c and returns dQ += scale dc2p Kr, dK += scale dp2c Qr, dKr = dc2p^T (scale Q), dQr = scale dp2c^T K,
// the tables' gradients summed per sequence, then over the sequences in order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <vector>

#include "attention_args.h"
#include "dropout_hash.h"
#include "fast_math.h"
#include "op_utils.h"

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
// MKL (torch's BLAS on x86) would otherwise start threads of its own inside torch's parallel region; weak, so
// that a torch built with another BLAS loads the library too (there the call is skipped).
extern "C" int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));

namespace bertfast {

namespace {

// Row-major C (m x n) = alpha op(A) op(B) + beta C, through column-major sgemm (C^T = op(B)^T op(A)^T).
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  sgemm_(&tb, &ta, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
}

struct Dropout {
  Key key;
  uint32_t threshold;
  float scale;
  bool on;

  // The hash's column terms of keys 0 .. keys - 1, shared by every row.
  std::vector<uint32_t> column_hashes(int64_t keys) const {
    std::vector<uint32_t> hashes(static_cast<size_t>(keys));
    for (int64_t j = 0; j < keys; ++j) hashes[j] = mix32(static_cast<uint32_t>(j) ^ key.k0);
    return hashes;
  }

  // The hash's row term of mask row `row` (a query's token * heads + head).
  uint32_t row_term(int64_t row) const { return static_cast<uint32_t>(row) ^ key.k1; }
};

Dropout dropout_of(const std::optional<at::Tensor>& seed, double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "dropout probability has to be between 0 and 1, but got ", p);
  const bool on = p > 0.0;
  TORCH_CHECK_VALUE(!on || seed.has_value(), "attention with dropout_p > 0 needs a seed");
  return Dropout{Key(on ? seed_of(*seed) : 0), threshold_of(p), keep_scale_of(p), on};
}

int64_t window_of(std::optional<int64_t> window) {
  TORCH_CHECK_VALUE(!window || *window >= 0, "window must be >= 0, got ", window.value_or(0));
  return window.value_or(-1);
}

// Row i of P (len keys) times Z: the mask row of query token `row_id` (= token * heads + head).
BERTFAST_CLONES
void drop_row(float* pr, int64_t len, const uint32_t* col_hash, uint32_t row_term, uint32_t threshold, float scale) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const uint32_t bits = mix32(col_hash[j] + row_term);
    pr[j] *= (bits >> 1) >= threshold ? scale : 0.0f;
  }
}

// S row i += bias at distance j - i (bias_h points at distance 0).
BERTFAST_INLINE void add_bias_row(float* sr, int64_t len, const float* bias_at_i) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) sr[j] += bias_at_i[j];
}

// Softmax of a score row in place; returns its log-sum-exp.
BERTFAST_CLONES
float softmax_row(float* sr, int64_t len) {
  float m;
  const float sum = exponentiate_row(sr, len, m);
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) sr[j] *= inv;
  return m + std::log(sum);
}

// P row from scores and the saved log-sum-exp: exp(s - lse) (s <= lse up to rounding: clamp to stay in range).
BERTFAST_CLONES
void probabilities_row(float* sr, int64_t len, float lse) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) sr[j] = fast_exp_nonpositive(std::min(sr[j] - lse, 0.0f));
}

BERTFAST_CLONES
float dot(const float* x, const float* y, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += x[j] * y[j];
  return acc;
}

// dS row: p * (dpd * z - d), where z is recovered from pd = p * z (p > 0; where p is 0, dS is 0 anyway).
BERTFAST_CLONES
void score_gradient_row(const float* p, const float* pd, float* dp, int64_t len, float d, bool dropout, float scale) {
  if (dropout) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) dp[j] = p[j] * ((pd[j] != 0.0f ? dp[j] * scale : 0.0f) - d);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) dp[j] = p[j] * (dp[j] - d);
  }
}

// The (sequence, head) tasks, longest first, dealt round robin to `threads` workers: worker w runs order[w],
// order[w + threads], ...
std::vector<int64_t> task_order(const int32_t* cu, int64_t batch, int64_t heads) {
  std::vector<int64_t> order(static_cast<size_t>(batch * heads));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return cu[x / heads + 1] - cu[x / heads] > cu[y / heads + 1] - cu[y / heads];
  });
  return order;
}

template <typename F>
void for_each_task(const PackedAttentionArgs& a, F&& run_task) {
  const std::vector<int64_t> order = task_order(a.offsets(), a.batch, a.heads);
  const int64_t tasks = static_cast<int64_t>(order.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    const int previous = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t t = w; t < tasks; t += workers) run_task(order[t], w);
    }
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  });
}

// Staging of one (sequence, head): rows [start, start + len) of q, k or v (which = 0, 1, 2) as float (len, D).
template <typename T>
void stage(const T* qkv, int64_t start, int64_t len, int64_t which, int64_t h, const PackedAttentionArgs& a,
           float* dst, float factor) {
  const int64_t token_stride = 3 * a.heads * a.head_dim;
  const T* src = qkv + start * token_stride + (which * a.heads + h) * a.head_dim;
  for (int64_t j = 0; j < len; ++j) {
    for (int64_t d = 0; d < a.head_dim; ++d) dst[j * a.head_dim + d] = to_float(src[j * token_stride + d]) * factor;
  }
}

// q (scaled), k and v of one (sequence, head), each (len, D).
template <typename T>
void stage_qkv(const T* qkv, int64_t start, int64_t len, int64_t h, const PackedAttentionArgs& a, float scale,
               float* q, float* k, float* v) {
  stage(qkv, start, len, 0, h, a, q, scale);
  stage(qkv, start, len, 1, h, a, k, 1.0f);
  stage(qkv, start, len, 2, h, a, v, 1.0f);
}

// Rows [start, start + len) of a (T, heads, D) tensor's head h as float (len, D), and back.
template <typename T>
void stage_heads(const T* x, int64_t start, int64_t len, int64_t h, const PackedAttentionArgs& a, float* dst) {
  for (int64_t j = 0; j < len; ++j) {
    const T* row = x + ((start + j) * a.heads + h) * a.head_dim;
    for (int64_t d = 0; d < a.head_dim; ++d) dst[j * a.head_dim + d] = to_float(row[d]);
  }
}

// Where the tokens of one sequence sit, for distances (the bias and the window): their columns in the padded
// row (increasing), or, without columns, their index in the sequence.
struct Places {
  const int64_t* col;

  int64_t at(int64_t i) const { return col ? col[i] : i; }
  // The first index j in [lo, hi) whose place is at least `value` (hi if none).
  int64_t first_at_least(int64_t value, int64_t lo, int64_t hi) const {
    if (col == nullptr) return std::clamp(value, lo, hi);
    return std::lower_bound(col + lo, col + hi, value) - col;
  }
};

// The keys [j0, j1) that a block of queries, or one query, may see: all of its sequence, or those within the
// window (|place(i) - place(j)| <= window; window < 0: no window).
struct Band {
  int64_t j0, j1;
};

BERTFAST_INLINE Band block_band(int64_t i0, int64_t i1, int64_t len, int64_t window, const Places& places) {
  if (window < 0) return {0, len};
  return {places.first_at_least(places.at(i0) - window, 0, len),
          places.first_at_least(places.at(i1 - 1) + window + 1, 0, len)};
}

BERTFAST_INLINE Band row_band(int64_t i, Band block, int64_t window, const Places& places) {
  if (window < 0) return block;
  return {places.first_at_least(places.at(i) - window, block.j0, block.j1),
          places.first_at_least(places.at(i) + window + 1, block.j0, block.j1)};
}

// Scores of query i for keys [j0, j0 + m) += the bias at each key - query distance (bias_h: distance 0).
BERTFAST_INLINE void add_bias(float* visible, int64_t m, const float* bias_h, int64_t i, int64_t j0,
                              const Places& places) {
  if (places.col == nullptr) {
    add_bias_row(visible, m, bias_h + (j0 - i));
    return;
  }
  for (int64_t j = 0; j < m; ++j) visible[j] += bias_h[places.col[j0 + j] - places.col[i]];
}

// DeBERTa's disentangled terms of one (sequence, head): c2p (len, rows) = scale q Kr^T and p2c (len, rows) =
// scale k Qr^T over the position rows [c0, c0 + rows) that the sequence's distances reach (either may be off).
struct Disentangled {
  const int64_t* index = nullptr;  // pos_index at distance 0 (negative distances index before it); null: off
  int64_t c0 = 0, rows = 0;
  float *kr = nullptr, *qr = nullptr;    // the staged rows of the tables, (rows, D)
  float *c2p = nullptr, *p2c = nullptr;  // (len, rows)

  bool on() const { return index != nullptr; }
  // The position row (minus c0) of query i and key j.
  int64_t row(int64_t i, int64_t j, const Places& places) const { return index[places.at(j) - places.at(i)] - c0; }
};

// Scores of query i for keys [j0, j0 + m) += its c2p and the keys' p2c terms.
BERTFAST_INLINE void add_disentangled(float* visible, int64_t m, int64_t i, int64_t j0, const Places& places,
                                      const Disentangled& dis) {
  for (int64_t j = 0; j < m; ++j) {
    const int64_t c = dis.row(i, j0 + j, places);
    float term = 0.0f;
    if (dis.c2p) term += dis.c2p[i * dis.rows + c];
    if (dis.p2c) term += dis.p2c[(j0 + j) * dis.rows + c];
    visible[j] += term;
  }
}

// The task's disentangled terms in `buf` (see Disentangled; at most 2 * (rows_max * D + len * rows_max) floats),
// from q (already scaled) and k of one (sequence, head); off when the call has none.
Disentangled disentangled_terms(const PackedAttentionArgs& a, int64_t h, int64_t len, int64_t max_seqlen,
                                const Places& places, const float* q, const float* k, float scale, float* buf) {
  Disentangled dis;
  if (!a.disentangled() || len == 0) return dis;
  dis.index = a.pos_index.const_data_ptr<int64_t>() + (max_seqlen - 1);
  const int64_t reach = places.at(len - 1) - places.at(0);
  int64_t lo = dis.index[0], hi = dis.index[0];
  for (int64_t d = -reach; d <= reach; ++d) {
    lo = std::min(lo, dis.index[d]);
    hi = std::max(hi, dis.index[d]);
  }
  dis.c0 = lo;
  dis.rows = hi - lo + 1;
  const int64_t D = a.head_dim;
  const auto stage_rows = [&](const at::Tensor& table, float* dst) {
    const float* src = table.const_data_ptr<float>();
    for (int64_t c = 0; c < dis.rows; ++c) std::copy_n(src + ((lo + c) * a.heads + h) * D, D, dst + c * D);
  };
  float* next = buf;
  if (a.pos_key.defined()) {
    dis.kr = next;
    dis.c2p = dis.kr + dis.rows * D;
    next = dis.c2p + len * dis.rows;
    stage_rows(a.pos_key, dis.kr);
    gemm(false, true, len, dis.rows, D, 1.0f, q, D, dis.kr, D, 0.0f, dis.c2p, dis.rows);
  }
  if (a.pos_query.defined()) {
    dis.qr = next;
    dis.p2c = dis.qr + dis.rows * D;
    stage_rows(a.pos_query, dis.qr);
    gemm(false, true, len, dis.rows, D, scale, k, D, dis.qr, D, 0.0f, dis.p2c, dis.rows);
  }
  return dis;
}

// The scratch floats of disentangled_terms for sequences of at most L tokens.
int64_t disentangled_scratch(const PackedAttentionArgs& a, int64_t L, int64_t max_seqlen) {
  if (!a.disentangled()) return 0;
  const int64_t rows = std::min(a.positions, 2 * max_seqlen - 1);
  return 2 * (rows * a.head_dim + L * rows);
}

// Probabilities of queries [i0, i1) over their block's band of keys, (i1 - i0, n) in s: the scores q k^T, the
// bias inside each row's own band, `normalise(visible, m, i, j0)` on that band (keys [j0, j0 + m)), zeros
// outside it.
template <typename F>
void block_probabilities(const float* q, const float* k, int64_t D, int64_t i0, int64_t i1, Band block,
                         int64_t window, const Places& places, const float* bias_h, const Disentangled& dis,
                         float* s, F&& normalise) {
  const int64_t n = block.j1 - block.j0;
  gemm(false, true, i1 - i0, n, D, 1.0f, q + i0 * D, D, k + block.j0 * D, D, 0.0f, s, n);
  for (int64_t i = i0; i < i1; ++i) {
    float* row = s + (i - i0) * n;
    const Band r = row_band(i, block, window, places);
    float* visible = row + (r.j0 - block.j0);
    const int64_t m = r.j1 - r.j0;
    if (bias_h) add_bias(visible, m, bias_h, i, r.j0, places);
    if (dis.on()) add_disentangled(visible, m, i, r.j0, places, dis);
    normalise(visible, m, i, r.j0);
    std::fill(row, visible, 0.0f);
    std::fill(visible + m, row + n, 0.0f);
  }
}

// Queries per block: a block's scores are (kQueryBlock, its band), so a window costs what it holds.
constexpr int64_t kQueryBlock = 64;

template <typename T>
void forward(const T* qkv, const PackedAttentionArgs& a, int64_t max_seqlen, float scale, int64_t window,
             const Dropout& drop, T* out, float* lse) {
  const int64_t* columns = a.columns_data();
  const int64_t L = a.longest, D = a.head_dim;
  const std::vector<uint32_t> col_hash = drop.column_hashes(L);
  const int64_t workers = std::max<int64_t>(1, at::get_num_threads());
  std::vector<std::vector<float>> scratch(static_cast<size_t>(workers));
  for_each_task(a, [&](int64_t task, int64_t w) {
    const int64_t b = task / a.heads, h = task % a.heads;
    const int64_t start = a.offsets()[b], len = a.offsets()[b + 1] - start;
    if (len == 0) return;
    std::vector<float>& buf = scratch[w];
    buf.resize(static_cast<size_t>(4 * L * D + kQueryBlock * L + disentangled_scratch(a, L, max_seqlen)));
    float *q = buf.data(), *k = q + L * D, *v = k + L * D, *o = v + L * D, *s = o + L * D;
    stage_qkv(qkv, start, len, h, a, scale, q, k, v);
    const float* bias_h = a.bias_data() ? a.bias_data() + h * (2 * max_seqlen - 1) + (max_seqlen - 1) : nullptr;
    const Places places{columns ? columns + start : nullptr};
    const Disentangled dis = disentangled_terms(a, h, len, max_seqlen, places, q, k, scale, s + kQueryBlock * L);
    for (int64_t i0 = 0; i0 < len; i0 += kQueryBlock) {
      const int64_t i1 = std::min(len, i0 + kQueryBlock);
      const Band block = block_band(i0, i1, len, window, places);
      const int64_t n = block.j1 - block.j0;
      block_probabilities(q, k, D, i0, i1, block, window, places, bias_h, dis, s,
                          [&](float* visible, int64_t m, int64_t i, int64_t j0) {
                            lse[(start + i) * a.heads + h] = softmax_row(visible, m);
                            if (!drop.on) return;
                            drop_row(visible, m, col_hash.data() + j0, drop.row_term((start + i) * a.heads + h),
                                     drop.threshold, drop.scale);
                          });
      gemm(false, false, i1 - i0, D, n, 1.0f, s, n, v + block.j0 * D, D, 0.0f, o + i0 * D, D);
    }
    for (int64_t i = 0; i < len; ++i) {
      T* dst = out + ((start + i) * a.heads + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(o[i * D + d]);
    }
  });
}

// The gradients that are summed over sequences, each sequence's share apart (null where the call has none):
// the bias's (batch, heads, distances) and the position tables' (batch, heads, positions, D).
struct SequenceShares {
  float* bias = nullptr;
  float* pos_key = nullptr;
  float* pos_query = nullptr;
};

template <typename T>
void backward(const T* dout, const T* qkv, const float* lse, const PackedAttentionArgs& a, int64_t max_seqlen,
              float scale, int64_t window, const Dropout& drop, T* dqkv, const SequenceShares& shares) {
  const int64_t L = a.longest, D = a.head_dim, distances = 2 * max_seqlen - 1;
  const int64_t* columns = a.columns_data();
  const std::vector<uint32_t> col_hash = drop.column_hashes(L);
  const int64_t workers = std::max<int64_t>(1, at::get_num_threads());
  std::vector<std::vector<float>> scratch(static_cast<size_t>(workers));
  const int64_t token_stride = 3 * a.heads * D;
  for_each_task(a, [&](int64_t task, int64_t w) {
    const int64_t b = task / a.heads, h = task % a.heads;
    const int64_t start = a.offsets()[b], len = a.offsets()[b + 1] - start;
    if (len == 0) return;
    std::vector<float>& buf = scratch[w];
    const int64_t dis_floats = disentangled_scratch(a, L, max_seqlen);
    buf.resize(static_cast<size_t>(7 * L * D + 3 * kQueryBlock * L + 2 * dis_floats));
    float *q = buf.data(), *k = q + L * D, *v = k + L * D, *dout_h = v + L * D, *dq = dout_h + L * D,
          *dk = dq + L * D, *dv = dk + L * D, *p = dv + L * D, *pd = p + kQueryBlock * L,
          *ds = pd + kQueryBlock * L, *dis_buf = ds + kQueryBlock * L, *ddis = dis_buf + dis_floats;
    stage_qkv(qkv, start, len, h, a, scale, q, k, v);
    stage_heads(dout, start, len, h, a, dout_h);
    std::fill(dk, dk + len * D, 0.0f);  // dK and dV gather every query block's share
    std::fill(dv, dv + len * D, 0.0f);
    const float* bias_h = a.bias_data() ? a.bias_data() + h * distances + (max_seqlen - 1) : nullptr;
    float* db = shares.bias ? shares.bias + (b * a.heads + h) * distances + (max_seqlen - 1) : nullptr;
    const Places places{columns ? columns + start : nullptr};
    const Disentangled dis = disentangled_terms(a, h, len, max_seqlen, places, q, k, scale, dis_buf);
    // dc2p and dp2c: dS summed by position row, per query (c2p) and per key (p2c).
    float* dc2p = ddis;
    float* dp2c = dc2p + len * dis.rows;
    std::fill(ddis, ddis + 2 * len * dis.rows, 0.0f);
    for (int64_t i0 = 0; i0 < len; i0 += kQueryBlock) {
      const int64_t i1 = std::min(len, i0 + kQueryBlock), rows = i1 - i0;
      const Band block = block_band(i0, i1, len, window, places);
      const int64_t n = block.j1 - block.j0;
      // P, and P * Z in pd (zeros outside each row's band, as in P).
      block_probabilities(q, k, D, i0, i1, block, window, places, bias_h, dis, p,
                          [&](float* visible, int64_t m, int64_t i, int64_t j0) {
                            probabilities_row(visible, m, lse[(start + i) * a.heads + h]);
                            float* pdr = pd + (i - i0) * n;
                            std::fill(pdr, pdr + n, 0.0f);
                            std::copy(visible, visible + m, pdr + (j0 - block.j0));
                            if (!drop.on) return;
                            drop_row(pdr + (j0 - block.j0), m, col_hash.data() + j0,
                                     drop.row_term((start + i) * a.heads + h), drop.threshold, drop.scale);
                          });
      gemm(true, false, n, D, rows, 1.0f, pd, n, dout_h + i0 * D, D, 1.0f, dv + block.j0 * D, D);
      gemm(false, true, rows, n, D, 1.0f, dout_h + i0 * D, D, v + block.j0 * D, D, 0.0f, ds, n);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t row = (i - i0) * n;
        const float d_i = dot(pd + row, ds + row, n);
        score_gradient_row(p + row, pd + row, ds + row, n, d_i, drop.on, drop.scale);  // 0 outside the band
        if (db != nullptr || dis.on()) {
          const Band r = row_band(i, block, window, places);
          for (int64_t j = r.j0; j < r.j1; ++j) {
            const float g = ds[row + j - block.j0];
            if (db != nullptr) db[places.at(j) - places.at(i)] += g;
            if (dis.on()) {
              const int64_t c = dis.row(i, j, places);
              dc2p[i * dis.rows + c] += g;
              dp2c[j * dis.rows + c] += g;
            }
          }
        }
      }
      gemm(false, false, rows, D, n, scale, ds, n, k + block.j0 * D, D, 0.0f, dq + i0 * D, D);
      gemm(true, false, n, D, rows, 1.0f, ds, n, q + i0 * D, D, 1.0f, dk + block.j0 * D, D);
    }
    const int64_t table_stride = a.positions * D;
    if (dis.c2p) {
      gemm(false, false, len, D, dis.rows, scale, dc2p, dis.rows, dis.kr, D, 1.0f, dq, D);
      float* dkr = shares.pos_key + (b * a.heads + h) * table_stride + dis.c0 * D;
      gemm(true, false, dis.rows, D, len, 1.0f, dc2p, dis.rows, q, D, 0.0f, dkr, D);
    }
    if (dis.p2c) {
      gemm(false, false, len, D, dis.rows, scale, dp2c, dis.rows, dis.qr, D, 1.0f, dk, D);
      float* dqr = shares.pos_query + (b * a.heads + h) * table_stride + dis.c0 * D;
      gemm(true, false, dis.rows, D, len, scale, dp2c, dis.rows, k, D, 0.0f, dqr, D);
    }
    for (int64_t i = 0; i < len; ++i) {
      T* row = dqkv + (start + i) * token_stride + h * D;
      for (int64_t d = 0; d < D; ++d) {
        row[d] = from_float<T>(dq[i * D + d]);
        row[a.heads * D + d] = from_float<T>(dk[i * D + d]);
        row[2 * a.heads * D + d] = from_float<T>(dv[i * D + d]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& qkv, const at::Tensor& cu_seqlens,
                                                         int64_t max_seqlen, double scale,
                                                         const std::optional<at::Tensor>& bias,
                                                         const std::optional<at::Tensor>& seed, double dropout_p,
                                                         std::optional<int64_t> window,
                                                         const std::optional<at::Tensor>& columns,
                                                         const std::optional<at::Tensor>& pos_key,
                                                         const std::optional<at::Tensor>& pos_query,
                                                         const std::optional<at::Tensor>& pos_index) {
  PackedAttentionArgs a = check_packed_attention(qkv, cu_seqlens, max_seqlen, bias, columns);
  check_disentangled(a, max_seqlen, pos_key, pos_query, pos_index);
  const Dropout drop = dropout_of(seed, dropout_p);
  const int64_t band = window_of(window);
  return dispatch_float_bf16(qkv.scalar_type(), "attention_forward", [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor packed = activation(qkv, qkv.scalar_type(), "qkv");
    at::Tensor out = at::empty({a.total, a.heads, a.head_dim}, qkv.options());
    at::Tensor lse = at::empty({a.total, a.heads}, qkv.options().dtype(at::kFloat));
    forward<T>(data_of<T>(packed), a, max_seqlen, static_cast<float>(scale), band, drop, mutable_data_of<T>(out),
               lse.mutable_data_ptr<float>());
    return std::make_tuple(out, lse);
  });
}

// Each sequence's share summed in sequence order: the same bits for any thread count. parts (batch, rest...).
at::Tensor sum_over_sequences(const at::Tensor& parts, int64_t batch) {
  at::Tensor total = parts[0].clone();
  float* out = total.mutable_data_ptr<float>();
  const float* part = parts.const_data_ptr<float>();
  const int64_t n = total.numel();
  for (int64_t b = 1; b < batch; ++b) {
    for (int64_t e = 0; e < n; ++e) out[e] += part[b * n + e];
  }
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& lse,
    const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& seed, double dropout_p, std::optional<int64_t> window,
    const std::optional<at::Tensor>& columns, const std::optional<at::Tensor>& pos_key,
    const std::optional<at::Tensor>& pos_query, const std::optional<at::Tensor>& pos_index) {
  PackedAttentionArgs a = check_packed_attention(qkv, cu_seqlens, max_seqlen, bias, columns);
  check_disentangled(a, max_seqlen, pos_key, pos_query, pos_index);
  const Dropout drop = dropout_of(seed, dropout_p);
  const int64_t band = window_of(window);
  const std::vector<int64_t> rows_shape{a.total, a.heads, a.head_dim};
  TORCH_CHECK_VALUE(dout.sizes() == rows_shape, "dout must be ", rows_shape, ", got ", dout.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == std::vector<int64_t>({a.total, a.heads}) && lse.scalar_type() == at::kFloat,
                    "lse must be (tokens, heads) float32");
  const at::Tensor lse_c = lse.contiguous();
  const int64_t distances = 2 * max_seqlen - 1, sequences = std::max<int64_t>(a.batch, 1);
  const auto shares_of = [&](bool present, at::IntArrayRef rest) {
    std::vector<int64_t> shape{sequences};
    shape.insert(shape.end(), rest.begin(), rest.end());
    return present ? at::zeros(shape, lse.options()) : at::Tensor();
  };
  const at::Tensor dbias_parts = shares_of(a.bias.defined(), {a.heads, std::max<int64_t>(distances, 1)});
  const at::Tensor dkey_parts = shares_of(a.pos_key.defined(), {a.heads, a.positions, a.head_dim});
  const at::Tensor dquery_parts = shares_of(a.pos_query.defined(), {a.heads, a.positions, a.head_dim});
  const auto data = [](const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<float>() : nullptr; };
  return dispatch_float_bf16(qkv.scalar_type(), "attention_backward", [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor packed = activation(qkv, qkv.scalar_type(), "qkv");
    const at::Tensor dout_c = activation(dout, qkv.scalar_type(), "dout");
    at::Tensor dqkv = at::empty_like(packed);  // every (token, head) belongs to one task, which writes it
    backward<T>(data_of<T>(dout_c), data_of<T>(packed), lse_c.const_data_ptr<float>(), a,
                max_seqlen, static_cast<float>(scale), band, drop, mutable_data_of<T>(dqkv),
                SequenceShares{data(dbias_parts), data(dkey_parts), data(dquery_parts)});
    // (0,) for an absent input: a tensor of its own each, since outputs must not alias.
    const auto none = [&] { return at::empty({0}, lse.options()); };
    // The tables' gradients as the tables are laid out, (positions, heads, head_dim).
    const auto table = [&](const at::Tensor& parts) {
      return parts.defined() ? sum_over_sequences(parts, a.batch).permute({1, 0, 2}).contiguous() : none();
    };
    return std::make_tuple(dqkv, dbias_parts.defined() ? sum_over_sequences(dbias_parts, a.batch) : none(),
                           table(dkey_parts), table(dquery_parts));
  });
}

}  // namespace

}  // namespace bertfast

TORCH_LIBRARY_IMPL(bertfast, CPU, m) {
  m.impl("attention_forward", &bertfast::attention_forward_cpu);
  m.impl("attention_backward", &bertfast::attention_backward_cpu);
}
