// Python bindings of the native CPU kernels (bertfast._C).
//
// Tensors arrive as NumPy views of contiguous float32 torch tensors, so the
// extension is built against pybind11 alone (no torch headers, no CUDA).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "ops.h"

namespace py = pybind11;
using F32 = py::array_t<float, py::array::c_style>;

namespace {

int64_t rows_of(const F32& a, int64_t hidden, const char* name) {
  if (a.ndim() != 2 || a.shape(1) != hidden) {
    throw std::invalid_argument(std::string(name) + " must be (rows, " + std::to_string(hidden) + ")");
  }
  return a.shape(0);
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
}
