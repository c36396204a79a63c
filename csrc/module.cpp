// Python bindings of the native CPU kernels (bertfast._C).
//
// Tensors arrive as NumPy views of contiguous float32 torch tensors, so the
// extension is built against pybind11 alone (no torch headers, no CUDA).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "ops.h"

namespace py = pybind11;
using F32 = py::array_t<float, py::array::c_style>;
using I32 = py::array_t<int32_t, py::array::c_style>;

namespace {

int64_t rows_of(const F32& a, int64_t hidden, const char* name) {
  if (a.ndim() != 2 || a.shape(1) != hidden) {
    throw std::invalid_argument(std::string(name) + " must be (rows, " + std::to_string(hidden) + ")");
  }
  return a.shape(0);
}

// Rows of a C-contiguous array whose last dimension is hidden (any leading dimensions).
int64_t rows_of_any(const F32& a, int64_t hidden, const char* name) {
  if (a.ndim() < 1 || a.shape(a.ndim() - 1) != hidden) {
    throw std::invalid_argument(std::string(name) + " must end in a dimension of " + std::to_string(hidden));
  }
  return hidden == 0 ? 0 : static_cast<int64_t>(a.size()) / hidden;
}

void check_bias(const F32& b) {
  if (b.ndim() != 1) throw std::invalid_argument("bias must be 1-D");
}

F32 bias_gelu_forward(const F32& x, const F32& b) {
  check_bias(b);
  const int64_t hidden = b.shape(0);
  const int64_t rows = rows_of(x, hidden, "x");
  F32 y({rows, hidden});
  {
    py::gil_scoped_release release;
    bertfast::bias_gelu_forward(x.data(), b.data(), y.mutable_data(), rows, hidden);
  }
  return y;
}

py::tuple bias_gelu_backward(const F32& dy, const F32& x, const F32& b) {
  check_bias(b);
  const int64_t hidden = b.shape(0);
  const int64_t rows = rows_of(x, hidden, "x");
  if (rows_of(dy, hidden, "dy") != rows) throw std::invalid_argument("dy and x differ in rows");
  F32 dx({rows, hidden});
  F32 db({hidden});
  {
    py::gil_scoped_release release;
    bertfast::bias_gelu_backward(dy.data(), x.data(), b.data(), dx.mutable_data(), db.mutable_data(), rows,
                                 hidden);
  }
  return py::make_tuple(dx, db);
}

F32 dropout(const F32& x, const py::array_t<int64_t, py::array::c_style>& row_ids, uint64_t seed,
            uint32_t threshold, float scale) {
  if (x.ndim() != 2) throw std::invalid_argument("dropout takes a (rows, cols) array");
  if (row_ids.ndim() != 1 || row_ids.shape(0) != x.shape(0)) {
    throw std::invalid_argument("row_ids must hold one id per row of x");
  }
  if (threshold > 0x7fffffffU) throw std::invalid_argument("threshold must be below 2^31");
  F32 y({x.shape(0), x.shape(1)});
  {
    py::gil_scoped_release release;
    bertfast::dropout_apply(x.data(), y.mutable_data(), x.shape(0), x.shape(1), row_ids.data(), seed, threshold,
                            scale);
  }
  return y;
}

py::array_t<uint32_t> dropout_bits(uint64_t seed, const py::array_t<int64_t, py::array::c_style>& rows,
                                   int64_t n_cols) {
  if (rows.ndim() != 1 || n_cols < 0) throw std::invalid_argument("rows must be 1-D and n_cols >= 0");
  py::array_t<uint32_t> bits({rows.shape(0), static_cast<py::ssize_t>(n_cols)});
  uint32_t* out = bits.mutable_data();
  for (py::ssize_t r = 0; r < rows.shape(0); ++r) {
    for (int64_t c = 0; c < n_cols; ++c) out[r * n_cols + c] = bertfast::dropout_bits(seed, rows.data()[r], c);
  }
  return bits;
}

void packed_attention(const F32& qkv, const I32& cu_seqlens, int64_t max_seqlen, float scale, F32& out) {
  if (qkv.ndim() != 4 || qkv.shape(1) != 3) throw std::invalid_argument("qkv must be (tokens, 3, heads, head_dim)");
  if (cu_seqlens.ndim() != 1 || cu_seqlens.shape(0) < 1) {
    throw std::invalid_argument("cu_seqlens must be 1-D with batch + 1 offsets");
  }
  const int64_t total = qkv.shape(0), heads = qkv.shape(2), head_dim = qkv.shape(3);
  const int64_t batch = cu_seqlens.shape(0) - 1;
  const int32_t* cu = cu_seqlens.data();
  if (cu[0] != 0 || cu[batch] != total) {
    throw std::invalid_argument("cu_seqlens must start at 0 and end at the token count " + std::to_string(total) +
                                ", got " + std::to_string(cu[0]) + " and " + std::to_string(cu[batch]));
  }
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = static_cast<int64_t>(cu[b + 1]) - cu[b];
    if (len < 0) throw std::invalid_argument("cu_seqlens must be nondecreasing");
    longest = std::max(longest, len);
  }
  if (longest > max_seqlen) {
    throw std::invalid_argument("a sequence of " + std::to_string(longest) + " tokens is longer than max_seqlen " +
                                std::to_string(max_seqlen));
  }
  if (out.ndim() != 3 || out.shape(0) != total || out.shape(1) != heads || out.shape(2) != head_dim) {
    throw std::invalid_argument("out must be (tokens, heads, head_dim)");
  }
  {
    py::gil_scoped_release release;
    bertfast::packed_attention_forward(qkv.data(), cu, out.mutable_data(), batch, heads, head_dim, longest, scale);
  }
}

void add_layernorm(const F32& x, const std::optional<F32>& bias, const F32& residual, const F32& ln_weight,
                   const F32& ln_bias, float eps, F32& y) {
  if (ln_weight.ndim() != 1 || ln_bias.ndim() != 1 || ln_bias.shape(0) != ln_weight.shape(0)) {
    throw std::invalid_argument("ln_weight and ln_bias must be 1-D of the same size");
  }
  const int64_t hidden = ln_weight.shape(0);
  const int64_t rows = rows_of_any(x, hidden, "x");
  if (rows_of_any(residual, hidden, "residual") != rows) throw std::invalid_argument("x and residual differ in rows");
  if (bias && (bias->ndim() != 1 || bias->shape(0) != hidden)) {
    throw std::invalid_argument("bias must be (" + std::to_string(hidden) + ",)");
  }
  if (rows_of_any(y, hidden, "y") != rows) throw std::invalid_argument("x and y differ in rows");
  {
    py::gil_scoped_release release;
    bertfast::add_layernorm_forward(x.data(), bias ? bias->data() : nullptr, residual.data(), ln_weight.data(),
                                    ln_bias.data(), y.mutable_data(), rows, hidden, eps);
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bertfast native CPU kernels";
  m.def("bias_gelu_forward", &bias_gelu_forward, py::arg("x"), py::arg("bias"),
        "y = gelu(x + bias), exact erf GELU, float32");
  m.def("bias_gelu_backward", &bias_gelu_backward, py::arg("dy"), py::arg("x"), py::arg("bias"),
        "(dx, dbias) of y = gelu(x + bias)");
  m.def("dropout", &dropout, py::arg("x"), py::arg("row_ids"), py::arg("seed"), py::arg("threshold"),
        py::arg("scale"),
        "y[r, c] = x[r, c] * scale where the counter hash of (seed, row_ids[r], c) >> 1 >= threshold, else 0");
  m.def("dropout_bits", &dropout_bits, py::arg("seed"), py::arg("rows"), py::arg("n_cols"),
        "the 32-bit hashes of elements (row, col), col < n_cols, that dropout compares with its threshold");
  // These two write into a caller's buffer (a torch tensor's NumPy view): cheaper per call than
  // returning a new array for torch.from_numpy.
  m.def("packed_attention", &packed_attention, py::arg("qkv"), py::arg("cu_seqlens"), py::arg("max_seqlen"),
        py::arg("scale"), py::arg("out").noconvert(),
        "out (T, heads, head_dim) = attention of packed (T, 3, heads, head_dim) qkv, each sequence to itself, fp32");
  m.def("add_layernorm", &add_layernorm, py::arg("x"), py::arg("bias"), py::arg("residual"), py::arg("ln_weight"),
        py::arg("ln_bias"), py::arg("eps"), py::arg("out").noconvert(),
        "out = LayerNorm(x + bias + residual) over the rows of x; bias may be None");
}
