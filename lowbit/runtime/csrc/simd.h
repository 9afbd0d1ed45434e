// Small SIMD helpers shared by qgemv.cpp and decode_step.cpp (one copy, so the two cannot drift).
#pragma once
#if defined(__AVX2__)
#include <immintrin.h>

namespace lowbit {

// The sum of the eight float lanes of v.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

}  // namespace lowbit
#endif
