// Python bindings of the native CPU kernels (bertfast._C).
//
// Tensors arrive as NumPy views of contiguous float32 torch tensors, so the
// extension is built against pybind11 alone (no torch headers, no CUDA).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bertfast native CPU kernels";
  m.def("bias_gelu_forward", &bias_gelu_forward, py::arg("x"), py::arg("bias"),
        "y = gelu(x + bias), exact erf GELU, float32");
  m.def("bias_gelu_backward", &bias_gelu_backward, py::arg("dy"), py::arg("x"), py::arg("bias"),
        "(dx, dbias) of y = gelu(x + bias)");
}
