// Small SIMD helpers shared by the kernels (one copy, so they cannot drift).
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

// The eight sums of the lanes of v[0], …, v[7] as one vector (lane t: Σ lanes of v[t]), by a tree of horizontal adds:
// 8 shuffling adds for eight sums, where hsum takes 5 steps for one.
inline __m256 hsum8(const __m256* v) {
  const __m256 v01 = _mm256_hadd_ps(v[0], v[1]), v23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 v45 = _mm256_hadd_ps(v[4], v[5]), v67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 a = _mm256_hadd_ps(v01, v23), b = _mm256_hadd_ps(v45, v67);  // per 128-bit half: 4 rows' partials
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// The largest of the eight float lanes of v.
inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// acc + eight int32 sums of four u·s products each, u unsigned and s signed bytes: one VPDPBUSD, or
// VPMADDUBSW + VPMADDWD, whose int16 pair sums stay exact while 2·|u|·|s| ≤ 32767 (u ≤ 128, |s| ≤ 127).
inline __m256i dot_u8s8_acc(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// The same sums without an accumulator.
inline __m256i dot_u8s8(__m256i u, __m256i s) { return dot_u8s8_acc(_mm256_setzero_si256(), u, s); }

}  // namespace lowbit
#endif
