#pragma once

// Sum of squares of a contiguous row, accumulated in float: the inner loop of the sinks
// kernel, used where SDRPN_X86_SIMD is defined and cpu_has_avx2_f16c() holds. The extension is
// built for baseline x86-64, where converting float16 and bfloat16 goes element by element through
// c10's software conversion; on CPUs with AVX2 and F16C (checked once at run time) eight elements
// convert and accumulate per instruction, which is what makes the op bandwidth-bound rather than
// convert-bound.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SDRPN_X86_SIMD 1
#endif

namespace sdrpn::ops::cpu {

#ifdef SDRPN_X86_SIMD
// Eight lanes of the row, widened to float.
__attribute__((target("avx2,f16c"))) inline __m256 load8(const float* p) {
  return _mm256_loadu_ps(p);
}
__attribute__((target("avx2,f16c"))) inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
__attribute__((target("avx2,f16c"))) inline __m256 load8(const c10::BFloat16* p) {
  // A bfloat16 is the upper half of a float32.
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) float sum_squares_avx2(const scalar_t* row, int64_t n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  int64_t d = 0;
  for (; d + 32 <= n; d += 32) {
    for (int k = 0; k < 4; ++k) {
      const __m256 v = load8(row + d + 8 * k);
      acc[k] = _mm256_fmadd_ps(v, v, acc[k]);
    }
  }
  for (; d + 8 <= n; d += 8) {
    const __m256 v = load8(row + d);
    acc[0] = _mm256_fmadd_ps(v, v, acc[0]);
  }
  const __m256 total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  float lanes[8];
  _mm256_storeu_ps(lanes, total);
  float sum = 0;
  for (float lane : lanes) sum += lane;
  for (; d < n; ++d) {
    const auto v = static_cast<float>(row[d]);
    sum += v * v;
  }
  return sum;
}

inline bool cpu_has_avx2_f16c() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}
#endif

}  // namespace sdrpn::ops::cpu
