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

F32 dropout(const F32& x, uint64_t seed, uint64_t threshold, float scale) {
  if (threshold > (uint64_t{1} << 32)) throw std::invalid_argument("threshold must be at most 2^32");
  F32 y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  {
    py::gil_scoped_release release;
    bertfast::dropout_apply(x.data(), y.mutable_data(), x.size(), seed, threshold, scale);
  }
  return y;
}

py::array_t<uint32_t> dropout_bits(uint64_t seed, int64_t start, int64_t n) {
  if (start < 0 || n < 0) throw std::invalid_argument("start and n must be >= 0");
  py::array_t<uint32_t> bits(n);
  uint32_t* out = bits.mutable_data();
  for (int64_t i = 0; i < n; ++i) out[i] = bertfast::dropout_bits(seed, start + i);
  return bits;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bertfast native CPU kernels";
  m.def("bias_gelu_forward", &bias_gelu_forward, py::arg("x"), py::arg("bias"),
        "y = gelu(x + bias), exact erf GELU, float32");
  m.def("bias_gelu_backward", &bias_gelu_backward, py::arg("dy"), py::arg("x"), py::arg("bias"),
        "(dx, dbias) of y = gelu(x + bias)");
  m.def("dropout", &dropout, py::arg("x"), py::arg("seed"), py::arg("threshold"), py::arg("scale"),
        "y = x * scale where the counter-based hash of (seed, element index) >= threshold, else 0");
  m.def("dropout_bits", &dropout_bits, py::arg("seed"), py::arg("start"), py::arg("n"),
        "the 32-bit hashes of elements start..start+n-1 that dropout compares with its threshold");
}
