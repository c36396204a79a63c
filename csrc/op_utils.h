// What every CPU op of bertfast shares: argument checks that raise Python ValueErrors, the float32 / bf16
// dispatch, and row staging (a bf16 row is converted into float scratch, computed on, and stored back).
//
// Adding an op: declare its schema in library.cpp (TORCH_LIBRARY), write the kernel on float rows
// (BERTFAST_CLONES for the per-instruction-set builds), wrap it in a function of at::Tensors that checks its
// arguments and calls dispatch_float_bf16, and register that function for the CPU key at the bottom of its
// file: TORCH_LIBRARY_IMPL(bertfast, CPU, m) { m.impl("name", &name_cpu); }. Python registers its fake
// (bertfast/ops/native.py) and, where it has a gradient, its autograd (autograd.cpp).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "bf16.h"

namespace bertfast {

// f(T{}) with T = float or bf16 for the dtype of the op's activations; any other dtype is a ValueError.
template <typename F>
auto dispatch_float_bf16(at::ScalarType dtype, const char* op, F&& f) {
  if (dtype == at::kBFloat16) return f(bf16{});
  TORCH_CHECK_VALUE(dtype == at::kFloat, "bertfast::", op, " takes float32 or bfloat16 tensors, got ", dtype);
  return f(float{});
}

// The data of a contiguous tensor whose dtype T stands for (float or bf16).
template <typename T>
const T* data_of(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mutable_data_of(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
}

// An activation of the op's dtype, as a contiguous tensor.
inline at::Tensor activation(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must be ", dtype, " like the op's input, got ", t.scalar_type());
  return t.contiguous();
}

// A (hidden,) parameter (weights may be float32 under bf16 activations, or bf16), as contiguous float32.
inline at::Tensor parameter(const at::Tensor& t, int64_t hidden, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == hidden, name, " must be (", hidden, ",), got ", t.sizes());
  return t.to(at::kFloat).contiguous();
}

// Rows of T as float rows: load() gives a row's values (the row itself for float; a converted copy in
// slot `slot` of this object's scratch for bf16); out() gives where to compute a result row; store() writes
// it (nothing to do for float). One object per thread.
template <typename T>
struct Rows;

template <>
struct Rows<float> {
  Rows(int64_t, int) {}
  const float* load(const float* row, int) { return row; }
  float* out(float* row) { return row; }
  void store(const float*, float*) {}
};

template <>
struct Rows<bf16> {
  Rows(int64_t n, int slots) : n(n), slots(slots), scratch(static_cast<size_t>(n * (slots + 1))) {}
  const float* load(const bf16* row, int slot) {
    float* dst = scratch.data() + slot * n;
    bf16_to_float(row, dst, n);
    return dst;
  }
  float* out(bf16*) { return scratch.data() + slots * n; }
  void store(const float* values, bf16* row) { float_to_bf16(values, row, n); }

  int64_t n;
  int slots;
  std::vector<float> scratch;
};

}  // namespace bertfast
