// Row conversions between bfloat16 and float32, compiled per instruction set; the float -> bf16 direction
// uses AVX512-BF16's vcvtneps2bf16 on CPUs that have it (the loader checks once).
#include "bf16.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(BERTFAST_AVX2_ONLY)
#include <immintrin.h>
#define BERTFAST_HAVE_AVX512BF16_PATH 1
#endif

namespace bertfast {

namespace {

BERTFAST_CLONES
void float_to_bf16_portable(const float* src, bf16* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<bf16>(src[i]);
}

#ifdef BERTFAST_HAVE_AVX512BF16_PATH
__attribute__((target("avx512f,avx512bf16,avx512vl,avx512bw")))
void float_to_bf16_avx512bf16(const float* src, bf16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256bh packed = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), reinterpret_cast<const __m256i&>(packed));
  }
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1U << (n - i)) - 1U);
    const __m256bh packed = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(tail, src + i));
    _mm256_mask_storeu_epi16(dst + i, tail, reinterpret_cast<const __m256i&>(packed));
  }
}

const bool kHasAvx512Bf16 = __builtin_cpu_supports("avx512bf16");
#endif

}  // namespace

BERTFAST_CLONES
void bf16_to_float(const bf16* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

void float_to_bf16(const float* src, bf16* dst, int64_t n) {
#ifdef BERTFAST_HAVE_AVX512BF16_PATH
  if (kHasAvx512Bf16) return float_to_bf16_avx512bf16(src, dst, n);
#endif
  float_to_bf16_portable(src, dst, n);
}

}  // namespace bertfast
