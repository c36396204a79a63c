// Dropout on the CPU with a counter-based mask: nothing is stored, backward regenerates it (bertfast::dropout).
//
//   y[r, c] = x[r, c] * scale  if keep(seed, row[r], c)  else 0
//   keep(seed, row, col) = (hash(seed, row, col) >> 1) >= threshold,  threshold = min(round(p 2^31), 2^31 - 1)
//   hash(seed, row, col) = mix32(mix32(col ^ k0) + (row ^ k1)),  k0 = mix32(lo32(seed) ^ 0x9e3779b9),
//                          k1 = mix32(hi32(seed) ^ 0x7f4a7c15)     (all arithmetic mod 2^32)
//
// mix32 is Wellons' "lowbias32" integer finaliser (avalanche bias ~0.1%). The same function, bit for
// bit, is what the Triton kernels (bertfast.kernels.layernorm_common.dropout_keep) and the PyTorch
// reference (bertfast.common.dropout.keep_mask) compute, so every backend keeps the same elements for a
// seed. The row of an element is its token (and, for attention probabilities, token * heads + head);
// the column its position in the row. PyTorch's bernoulli_ draws from one Mersenne Twister stream
// element by element; this costs one mix32 per element (the column hashes are shared by all rows),
// vectorises (the row function is compiled per instruction set), and splits rows across torch's threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "dropout_hash.h"
#include "fast_math.h"
#include "op_utils.h"

namespace bertfast {

namespace {

BERTFAST_CLONES
void dropout_row(const float* xr, float* yr, const uint32_t* col_hash, uint32_t row_term, int64_t cols,
                 uint32_t threshold, float scale) {
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) {
    const uint32_t bits = mix32(col_hash[c] + row_term);
    yr[c] = xr[c] * ((bits >> 1) >= threshold ? scale : 0.0f);  // a multiply, like PyTorch's: inf * 0 is NaN
  }
}

template <typename T>
void dropout_apply(const T* x, T* y, int64_t rows, int64_t cols, const int64_t* row_ids, uint64_t seed,
                   uint32_t threshold, float scale) {
  const Key key(seed);
  std::vector<uint32_t> col_hash(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) col_hash[c] = mix32(static_cast<uint32_t>(c) ^ key.k0);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)), [&](int64_t r0, int64_t r1) {
    Rows<T> io(cols, 1);
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t row_term = static_cast<uint32_t>(row_ids ? row_ids[r] : r) ^ key.k1;
      float* yr = io.out(y + r * cols);
      dropout_row(io.load(x + r * cols, 0), yr, col_hash.data(), row_term, cols, threshold, scale);
      io.store(yr, y + r * cols);
    }
  });
}

at::Tensor row_ids_of(const std::optional<at::Tensor>& rows, int64_t n_rows) {
  if (!rows) return at::Tensor();
  check_cpu(*rows, "rows");
  TORCH_CHECK_VALUE(rows->dim() == 1 && rows->size(0) == n_rows, "rows must hold one id per row of x (", n_rows,
                    "), got ", rows->sizes());
  return rows->to(at::kLong).contiguous();
}

at::Tensor dropout_cpu(const at::Tensor& x, const at::Tensor& seed, double p, const std::optional<at::Tensor>& rows) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "dropout probability has to be between 0 and 1, but got ", p);
  TORCH_CHECK_VALUE(x.dim() >= 1, "bertfast::dropout: x must have a last (column) dimension");
  const int64_t cols = x.size(-1);
  const int64_t n_rows = cols == 0 ? 0 : x.numel() / cols;
  const at::Tensor ids = row_ids_of(rows, n_rows);
  const uint64_t s = seed_of(seed);
  const float scale = keep_scale_of(p);
  return dispatch_float_bf16(x.scalar_type(), "dropout", [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor xc = activation(x, x.scalar_type(), "x");
    at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    dropout_apply<T>(data_of<T>(xc), mutable_data_of<T>(y), n_rows, cols,
                     ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr, s, threshold_of(p), scale);
    return y;
  });
}

at::Tensor dropout_bits_cpu(const at::Tensor& seed, const at::Tensor& rows, int64_t n_cols) {
  TORCH_CHECK_VALUE(rows.dim() == 1 && n_cols >= 0, "rows must be 1-D and n_cols >= 0");
  const Key key(seed_of(seed));
  const at::Tensor ids = rows.to(at::kLong).contiguous();
  at::Tensor bits = at::empty({rows.size(0), n_cols}, rows.options().dtype(at::kLong));
  const int64_t* r = ids.const_data_ptr<int64_t>();
  int64_t* out = bits.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i) {
    for (int64_t c = 0; c < n_cols; ++c) {
      out[i * n_cols + c] = mix32(mix32(static_cast<uint32_t>(c) ^ key.k0) + (static_cast<uint32_t>(r[i]) ^ key.k1));
    }
  }
  return bits;
}

}  // namespace

}  // namespace bertfast

TORCH_LIBRARY_IMPL(bertfast, CPU, m) {
  m.impl("dropout", &bertfast::dropout_cpu);
  m.impl("dropout_bits", &bertfast::dropout_bits_cpu);
}
