// Branch-free float math that vectorises (libm's scalar calls would not), shared by the kernels.
#pragma once
#include <cstdint>
#include <cstring>

// A function marked BERTFAST_CLONES is compiled for AVX-512, AVX2 and baseline x86-64, and the loader
// picks the one for the CPU it runs on; what it calls should be BERTFAST_INLINE so that each clone
// vectorises it for its own target. (The build targets baseline x86-64, for portable binaries.)
// BERTFAST_AVX2_ONLY (CMake option of that name) leaves the AVX-512 clone out, so that an AVX-512 machine runs
// and tests the AVX2 code paths.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(BERTFAST_AVX2_ONLY)
#define BERTFAST_CLONES __attribute__((target_clones("avx2", "default")))
#define BERTFAST_INLINE inline __attribute__((always_inline))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BERTFAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define BERTFAST_INLINE inline __attribute__((always_inline))
#else
#define BERTFAST_CLONES
#define BERTFAST_INLINE inline
#endif

namespace bertfast {

// exp(x) for x <= 0: 2^n * e^r with |r| <= ln2/2, Cephes polynomial; within a few 1e-7 relative of
// libm, and 0-ish (e^-87) below -87.
BERTFAST_INLINE float fast_exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  // Round x * log2(e) to the nearest integer n without a branch: adding 1.5 * 2^23 pushes the
  // fraction out of the float's mantissa.
  constexpr float kRound = 12582912.0f;
  const float fn = (x * 1.44269504088896341f + kRound) - kRound;
  const int32_t n = static_cast<int32_t>(fn);
  const float r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  const float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// The unnormalised softmax of a score row, in place: row[j] = exp(row[j] - max), returning the sum of the
// exponentials; `max` is set to the row's maximum (the log-sum-exp is max + log(sum)).
BERTFAST_INLINE float exponentiate_row(float* row, int64_t len, float& max) {
  float m = row[0];
  for (int64_t j = 1; j < len; ++j) m = m > row[j] ? m : row[j];
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) {
    const float e = fast_exp_nonpositive(row[j] - m);
    row[j] = e;
    sum += e;
  }
  max = m;
  return sum;
}

}  // namespace bertfast
