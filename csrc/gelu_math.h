// The exact (erf) GELU and its derivative as branch-free float math that vectorises, shared by the GELU kernels:
//   gelu(u) = u * Phi(u) = 0.5 u (1 + erf(u / sqrt 2)),  gelu'(u) = Phi(u) + u * phi(u).
#pragma once
#include "fast_math.h"

namespace bertfast {

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

// erf(x) = x P(x^2) / Q(x^2) on [-4, 4] (|erf(4)| rounds to 1 in float); max error ~4e-7.
BERTFAST_INLINE float fast_erf(float x) {
  x = x > 4.0f ? 4.0f : (x < -4.0f ? -4.0f : x);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

BERTFAST_INLINE float gelu(float u) { return 0.5f * u * (1.0f + fast_erf(u * kInvSqrt2)); }

BERTFAST_INLINE float gelu_derivative(float u) {
  const float cdf = 0.5f * (1.0f + fast_erf(u * kInvSqrt2));
  const float pdf = kInvSqrt2Pi * fast_exp_nonpositive(-0.5f * u * u);
  return cdf + u * pdf;
}

}  // namespace bertfast
