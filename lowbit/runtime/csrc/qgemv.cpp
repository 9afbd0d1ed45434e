// lowbit's packed low-bit GEMV and dequantization. One source, compiled once per ISA level
// (generic C++, x86-64-v3 = AVX2/FMA/F16C, x86-64-v4 + VNNI); the compiler's own macros choose the
// instructions, so every level computes the same integers.
//
// Layout (lowbit/runtime/layout.py is the reference): per weight row, blocks of B = 32 columns,
// each B·bits/8 bytes of codes c:
//   8 bits: c[i] signed (int8), byte i.
//   4 bits: byte i = c[i] | c[i+16] << 4                              (i < 16)
//   2 bits: byte i = c[i] | c[i+8] << 2 | c[i+16] << 4 | c[i+24] << 6  (i < 8)
//   3 bits: the 2-bit layout of c & 3, then a 32-bit little-endian word whose bit i is c[i] >> 2.
// Per group j of g columns (g a multiple of B) a float16 scale s_j and an optional offset o_j:
// w = s_j·(c − c₀) + o_j, c₀ the zero code (2^(bits−1), or 0 for 8 bits; layout.zero_code).
//
// Activations are quantized per block b to int8 (x ≈ d_b·xq, d_b = max|x|/127) as llama.cpp does, so
//   y_n = Σ_j s_j Σ_{b∈j} d_b ((c − c₀)·xq)_b  +  Σ_j o_j X_j,     X_j = Σ_{b∈j} d_b Σ_i xq_i,
// where (c·xq)_b is one unsigned×signed byte dot product (VPDPBUSD, or VPMADDUBSW + VPMADDWD).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "qgemv.h"
#include "simd.h"

namespace lowbit {

namespace {

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The 32 codes of one block, as bytes (signed for 8 bits, 0 … 2^bits − 1 otherwise).
template <int BITS>
inline void unpack_block_scalar(const uint8_t* p, uint8_t* c) {
  if constexpr (BITS == 8) {
    std::memcpy(c, p, kBlock);
  } else if constexpr (BITS == 4) {
    for (int i = 0; i < 16; ++i) {
      c[i] = p[i] & 15;
      c[i + 16] = p[i] >> 4;
    }
  } else {
    for (int i = 0; i < 8; ++i)
      for (int s = 0; s < 4; ++s) c[i + 8 * s] = (p[i] >> (2 * s)) & 3;
    if constexpr (BITS == 3) {
      const uint32_t hi = load_u32(p + 8);
      for (int i = 0; i < kBlock; ++i) c[i] |= ((hi >> i) & 1) << 2;
    }
  }
}

// c₀, the code of w = 0 on a symmetric grid (layout.zero_code).
template <int BITS>
constexpr int zero_code() { return BITS == 8 ? 0 : 1 << (BITS - 1); }

struct Activations {
  int64_t M = 0, K = 0, groups = 0;
  std::vector<int8_t> q;     // [M, K]
  std::vector<float> d;      // [M, K / B]
  std::vector<float> sums;   // [M, groups]: X_j
  std::vector<float> dv;     // [M, K / B, 8]: d_b broadcast for the 256-bit kernels
  std::vector<int8_t> qz;    // [M, K / 2B, 2B]: block pairs in the lane order of unpack_pair (pair kernels)
  std::vector<float> dz;     // [M, K / 2B, kPairLanes]: d_b of each int32 lane of a pair's dot product
  std::vector<float> xs;     // [M, K / 2B, kPairLanes]: X_b shared out over its block's lanes (group = block)
};

// x ≈ d·xq per block of B, round to nearest even, as the scalar and vector paths both do.
void quantize_block(const float* x, int8_t* xq, float* d, int32_t* qsum) {
#if defined(__AVX2__)
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(amax, 1), _mm256_castps256_ps128(amax));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float scale = _mm_cvtss_f32(m4) / 127.f;
  const __m256 inv = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
  __m256i iv[4];
  for (int i = 0; i < 4; ++i)
    iv[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
  __m128i s4 = _mm_add_epi32(_mm256_extracti128_si256(s32, 1), _mm256_castsi256_si128(s32));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  *qsum = _mm_cvtsi128_si32(s4);
  // Pack 32-bit → 8-bit; the two packs interleave 128-bit lanes, the permute restores column order.
  const __m256i p16a = _mm256_packs_epi32(iv[0], iv[1]), p16b = _mm256_packs_epi32(iv[2], iv[3]);
  const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq),
                      _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  *d = scale;
#else
  float amax = 0.f;
  for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = amax / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
  int32_t s = 0;
  for (int i = 0; i < kBlock; ++i) {
    const int v = static_cast<int>(std::nearbyint(x[i] * inv));
    xq[i] = static_cast<int8_t>(v);
    s += v;
  }
  *qsum = s;
  *d = scale;
#endif
}

void quantize_activations(const float* x, int64_t M, int64_t K, int64_t group, Activations& a) {
  const int64_t nb = K / kBlock, bpg = group / kBlock;
  a.M = M, a.K = K, a.groups = K / group;
  a.q.resize(M * K), a.d.resize(M * nb), a.sums.assign(M * a.groups, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      int32_t qsum;
      quantize_block(x + m * K + b * kBlock, a.q.data() + m * K + b * kBlock, a.d.data() + m * nb + b, &qsum);
      a.sums[m * a.groups + b / bpg] += a.d[m * nb + b] * static_cast<float>(qsum);
    }
}

// Σ_j v_j X_j for the float16 per-group values v of weight row n (offsets, or scales) and activation
// row m; 0 without values.
inline float group_dot(const uint16_t* V, int64_t n, int64_t G, const Activations& a, int64_t m) {
  if (!V) return 0.f;
  const uint16_t* o = V + n * G;
  const float* X = a.sums.data() + m * G;
  float t = 0.f;
  int64_t j = 0;
#if defined(__F16C__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= G; j += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(o + j))),
                          _mm256_loadu_ps(X + j), acc);
  t = hsum(acc);
#endif
  for (; j < G; ++j) t += half_to_float(o[j]) * X[j];
  return t;
}

// The per-row terms outside the block loop: Σ_j o_j X_j − zero·Σ_j s_j X_j, zero being c₀ (or, for
// kernels that offset signed 8-bit codes to c + 128, 128).
template <int BITS>
inline float row_terms(const uint16_t* S, const uint16_t* O, int64_t n, int64_t G, const Activations& a, int64_t m,
                       int zero = zero_code<BITS>()) {
  return group_dot(O, n, G, a, m) - (zero ? static_cast<float>(zero) * group_dot(S, n, G, a, m) : 0.f);
}

#if defined(__AVX2__)
template <int BITS>
inline __m256i unpack_block(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else if constexpr (BITS == 4) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
  } else {
    int64_t bits;
    std::memcpy(&bits, p, 8);
    const __m256i lanes = _mm256_srlv_epi64(_mm256_set1_epi64x(bits), _mm256_setr_epi64x(0, 2, 4, 6));
    __m256i c = _mm256_and_si256(lanes, _mm256_set1_epi8(3));
    if constexpr (BITS == 3) {
      // Bit i of the word → byte i: broadcast byte i/8 to byte i, then test bit i%8.
      const __m256i bytes = _mm256_shuffle_epi8(
          _mm256_set1_epi32(static_cast<int>(load_u32(p + 8))),
          _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
      const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
      const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
      c = _mm256_or_si256(c, _mm256_and_si256(set, _mm256_set1_epi8(4)));
    }
    return c;
  }
}

template <int BITS>
inline __m256i dot_block(__m256i c, __m256i x) {
  if constexpr (BITS == 8) return dot_u8s8(_mm256_sign_epi8(c, c), _mm256_sign_epi8(x, c));
  else return dot_u8s8(c, x);
}

#endif

#if defined(__AVX2__)
// Asks for the next R rows' codes and scales while this tile computes: a GEMV streams every weight once
// per token, and the hardware prefetcher alone reached about half of torch's own GEMV bandwidth here.
template <int BITS, int R>
inline void prefetch_tile(const uint8_t* W, const uint16_t* S, int64_t n, int64_t nb, int64_t G) {
  constexpr int64_t bb = kBlock * BITS / 8;
  const char* w = reinterpret_cast<const char*>(W + (n + R) * nb * bb);
  for (int64_t off = 0; off < R * nb * bb; off += 64) _mm_prefetch(w + off, _MM_HINT_T0);
  const char* s = reinterpret_cast<const char*>(S + (n + R) * G);
  for (int64_t off = 0; off < R * G * 2; off += 64) _mm_prefetch(s + off, _MM_HINT_T0);
}
#endif

// Weight rows processed together: independent accumulator chains, and each activation block
// loaded once for all of them (fewer for more activation rows, to stay within the registers).
constexpr int tile_rows(int M) { return M == 1 ? 4 : (M == 2 ? 2 : 1); }

#if defined(__AVX2__)
// y[m, n] for R weight rows from n, one block per step: per group, Σ_b cvt(c·xq)_b · d_b accumulates in
// g_acc, then acc += s_j · g_acc, so the inner loop is one dot product and one FMA per block and row.
template <int BITS, int M, int R>
inline void gemv_tile(const uint8_t* W, const uint16_t* S, const uint16_t* O, int64_t n, int64_t K, int64_t group,
                      const Activations& a, float* y, int64_t N) {
  constexpr int64_t bb = kBlock * BITS / 8;
  const int64_t nb = K / kBlock, bpg = group / kBlock, G = K / group;
  const __m256* dv = reinterpret_cast<const __m256*>(a.dv.data());
  prefetch_tile<BITS, R>(W, S, n, nb, G);
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  if (bpg == 1) {  // a scale per block: eight converted at once, each multiplied into d_b as a broadcast load
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
      const int64_t nb8 = std::min<int64_t>(8, nb - b0);
      alignas(32) float s[R][8];
      for (int r = 0; r < R; ++r) {
        if (nb8 == 8) _mm256_store_ps(s[r], _mm256_cvtph_ps(_mm_loadu_si128(
                          reinterpret_cast<const __m128i*>(S + (n + r) * G + b0))));
        else for (int64_t i = 0; i < nb8; ++i) s[r][i] = half_to_float(S[(n + r) * G + b0 + i]);
      }
      for (int64_t i = 0; i < nb8; ++i) {
        const int64_t b = b0 + i;
        __m256i x[M];
        for (int m = 0; m < M; ++m)
          x[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + m * K + b * kBlock));
        for (int r = 0; r < R; ++r) {
          const __m256i c = unpack_block<BITS>(W + ((n + r) * nb + b) * bb);
          const __m256 sb = _mm256_broadcast_ss(&s[r][i]);
          for (int m = 0; m < M; ++m)
            acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block<BITS>(c, x[m])), _mm256_mul_ps(sb, _mm256_loadu_ps(
                reinterpret_cast<const float*>(dv + m * nb + b))), acc[r][m]);
        }
      }
    }
  }
  for (int64_t j = 0; j < G && bpg > 1; ++j) {
    __m256 g_acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) g_acc[r][m] = _mm256_setzero_ps();
    for (int64_t b = j * bpg; b < (j + 1) * bpg; ++b) {
      __m256i x[M];
      for (int m = 0; m < M; ++m)
        x[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + m * K + b * kBlock));
      for (int r = 0; r < R; ++r) {
        const __m256i c = unpack_block<BITS>(W + ((n + r) * nb + b) * bb);
        for (int m = 0; m < M; ++m)
          g_acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block<BITS>(c, x[m])), _mm256_loadu_ps(
              reinterpret_cast<const float*>(dv + m * nb + b)), g_acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(half_to_float(S[(n + r) * G + j]));
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(g_acc[r][m], s, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      y[m * N + n + r] = hsum(acc[r][m]) + row_terms<BITS>(S, O, n + r, G, a, m);
}

// The pair kernels take two blocks A, B (2B columns) per step. unpack_pair puts their 64 codes in
// the vector lanes in whatever order is cheapest for the packed layout (one 512-bit vector, or two
// 256-bit halves: words 0–3 and 4–7); the activations are rearranged once per call to the same order
// (pair_order: the source 64-bit word of each destination word, words 0–3 from A, 4–7 from B), and
// each int32 lane of the dot product knows its block (pair_lane_of). The 256-bit kernels add their
// two halves' products, so lanes t and t + 8 of the order always belong to the same block.
template <int BITS>
constexpr std::array<int64_t, 8> pair_order() {
  if constexpr (BITS == 8) return {0, 1, 2, 3, 4, 5, 6, 7};  // [A | B]
  else if constexpr (BITS == 4) return {0, 1, 4, 5, 2, 3, 6, 7};  // [A lo | B lo | A hi | B hi] nibbles
  else return {0, 4, 1, 5, 2, 6, 3, 7};  // per 128-bit lane k: [A, B] codes 8k … 8k + 7
}

// 0 when int32 lane t (of 16) of a pair's dot product sums columns of A, 1 for B.
template <int BITS>
constexpr int pair_lane_of(int t) { return pair_order<BITS>()[t / 2] >= 4; }

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr int kPairLanes = 16;          // int32 lanes of one pair's dot product
constexpr bool kPairs8Bit = true;       // VPDPBUSD takes 8-bit codes as c + 128
constexpr bool kOffsetsInLoop = false;  // offsets are added per row after the loop
constexpr bool kRowPanels = false;      // several activation rows go through gemv_tile_pairs, kMaxRows at a time
#else
constexpr int kPairLanes = 8;
constexpr bool kPairs8Bit = false;      // VPMADDUBSW would saturate on c + 128: 8-bit keeps one block per step
constexpr bool kOffsetsInLoop = true;   // groups of one block: o_b·X_b in the block loop, from xs
constexpr bool kRowPanels = true;       // several activation rows go through gemv_panels, all at once
#endif

// The pair kernels need whole pairs that never straddle a group.
inline bool pairs_fit(int64_t bits, int64_t K, int64_t group) {
  const int64_t nb = K / kBlock, bpg = group / kBlock;
  return (bits != 8 || kPairs8Bit) && nb % 2 == 0 && (bpg == 1 || bpg % 2 == 0);
}

// qz, dz and xs: the blocks of each pair in pair_order, each int32 lane's d_b and (when the kernel adds
// offsets in its loop, every group being one block) the lane's share of X_b.
template <int BITS>
void arrange_pairs(Activations& a, bool offsets) {
  constexpr auto order = pair_order<BITS>();
  const int64_t nb = a.K / kBlock, np = nb / 2;
  constexpr int per_block = kPairLanes / 2;
  const bool block_groups = kOffsetsInLoop && offsets && a.groups == nb;
  a.qz.resize(a.M * a.K), a.dz.resize(a.M * np * kPairLanes), a.xs.resize(block_groups ? a.M * np * kPairLanes : 0);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t p = 0; p < np; ++p) {
      const int64_t i = m * np + p;
      const int8_t* x = a.q.data() + m * a.K + 2 * p * kBlock;
      for (int w = 0; w < 8; ++w) std::memcpy(a.qz.data() + i * 2 * kBlock + 8 * w, x + 8 * order[w], 8);
      for (int t = 0; t < kPairLanes; ++t) {
        const int64_t b = m * nb + 2 * p + pair_lane_of<BITS>(t);
        a.dz[i * kPairLanes + t] = a.d[b];
        if (block_groups) a.xs[i * kPairLanes + t] = a.sums[b] / per_block;
      }
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
template <int BITS>
inline __m512i pair_lane_block() {
  alignas(64) int32_t lanes[16];
  for (int t = 0; t < 16; ++t) lanes[t] = pair_lane_of<BITS>(t);
  return _mm512_load_si512(lanes);
}

template <int BITS>
inline __m512i unpack_pair(const uint8_t* p) {
  constexpr int64_t bb = kBlock * BITS / 8;
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512(p);
  } else if constexpr (BITS == 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1),
                            _mm512_set1_epi8(0x0F));
  } else {
    int64_t lo_a, lo_b;
    std::memcpy(&lo_a, p, 8);
    std::memcpy(&lo_b, p + bb, 8);
    const __m512i v = _mm512_broadcast_i32x4(_mm_set_epi64x(lo_b, lo_a));
    __m512i c = _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_setr_epi64(0, 0, 2, 2, 4, 4, 6, 6)),
                                 _mm512_set1_epi8(3));
    if constexpr (BITS == 3) {
      // Byte 16k + i holds A's code 8k + i, byte 16k + 8 + i B's: interleave the two high-bit words by byte.
      const __mmask64 hi = _pdep_u64(load_u32(p + 8), 0x00FF00FF00FF00FFULL) |
                           _pdep_u64(load_u32(p + bb + 8), 0xFF00FF00FF00FF00ULL);
      c = _mm512_mask_add_epi8(c, hi, c, _mm512_set1_epi8(4));
    }
    return c;
  }
}

// Sixteen int32 partial sums of c·x; 8-bit codes are signed, so they are offset to c + 128 (unsigned),
// which adds 128·Σx per block: the caller subtracts (c₀ or 128)·Σ_j s_j X_j.
template <int BITS>
inline __m512i dot_pair(__m512i c, const int8_t* x) {
  if constexpr (BITS == 8) c = _mm512_xor_si512(c, _mm512_set1_epi8(static_cast<char>(0x80)));
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, _mm512_loadu_si512(x));
}

// y[m, n] for R weight rows from n, two blocks per step. Group size one block: each lane's multiplier
// is s_j·d_b; larger groups (an even number of blocks) accumulate Σ cvt(c·xq)·d_b per group first.
template <int BITS, int M, int R>
inline void gemv_tile_pairs(const uint8_t* W, const uint16_t* S, const uint16_t* O, int64_t n, int64_t K,
                            int64_t group, const Activations& a, float* y, int64_t N) {
  constexpr int64_t bb = kBlock * BITS / 8;
  const int64_t nb = K / kBlock, np = nb / 2, bpg = group / kBlock, G = K / group;
  const int8_t* xz = a.qz.data();
  const float* dz = a.dz.data();
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  if (bpg == 1) {
    const __m512i lane_block = pair_lane_block<BITS>();
    for (int64_t p = 0; p < np; ++p)
      for (int r = 0; r < R; ++r) {
        const __m512i c = unpack_pair<BITS>(W + ((n + r) * nb + 2 * p) * bb);
        const __m128 s_ab = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(load_u32(
            reinterpret_cast<const uint8_t*>(S + (n + r) * G + 2 * p)))));
        const __m512 s = _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(s_ab));
        for (int m = 0; m < M; ++m)
          acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_pair<BITS>(c, xz + (m * np + p) * 2 * kBlock)),
                                      _mm512_mul_ps(s, _mm512_loadu_ps(dz + (m * np + p) * 16)), acc[r][m]);
      }
  } else {
    for (int64_t j = 0; j < G; ++j) {
      __m512 g_acc[R][M];
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) g_acc[r][m] = _mm512_setzero_ps();
      for (int64_t p = j * bpg / 2; p < (j + 1) * bpg / 2; ++p)
        for (int r = 0; r < R; ++r) {
          const __m512i c = unpack_pair<BITS>(W + ((n + r) * nb + 2 * p) * bb);
          for (int m = 0; m < M; ++m)
            g_acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_pair<BITS>(c, xz + (m * np + p) * 2 * kBlock)),
                                          _mm512_loadu_ps(dz + (m * np + p) * 16), g_acc[r][m]);
        }
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_set1_ps(half_to_float(S[(n + r) * G + j]));
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(g_acc[r][m], s, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      y[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]) +
                         row_terms<BITS>(S, O, n + r, G, a, m, BITS == 8 ? 128 : zero_code<BITS>());
    }
}
#else
// The pair's codes as two 256-bit halves: lo = words 0–3 of pair_order, hi = words 4–7 (2, 3, 4 bits).
template <int BITS>
inline void unpack_pair(const uint8_t* p, __m256i& lo, __m256i& hi) {
  constexpr int64_t bb = kBlock * BITS / 8;
  if constexpr (BITS == 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), nibble = _mm256_set1_epi8(0x0F);
    lo = _mm256_and_si256(v, nibble);
    hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
  } else {
    int64_t lo_a, lo_b;
    std::memcpy(&lo_a, p, 8);
    std::memcpy(&lo_b, p + bb, 8);
    const __m256i v = _mm256_broadcastsi128_si256(_mm_set_epi64x(lo_b, lo_a)), two = _mm256_set1_epi8(3);
    lo = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 2, 2)), two);
    hi = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(4, 4, 6, 6)), two);
    if constexpr (BITS == 3) {
      // Byte 16k + i holds A's code 8k + i, byte 16k + 8 + i B's: spread byte k of each high-bit word
      // (A's in bytes 0–3 of the broadcast word, B's in 4–7) over them and test bit i.
      const __m256i words = _mm256_set1_epi64x(
          static_cast<int64_t>(load_u32(p + 8) | static_cast<uint64_t>(load_u32(p + bb + 8)) << 32));
      const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL)), four = _mm256_set1_epi8(4);
      const auto high = [&](__m256i spread) {
        const __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(words, spread), bit);
        return _mm256_and_si256(_mm256_cmpeq_epi8(b, bit), four);
      };
      lo = _mm256_or_si256(lo, high(_mm256_setr_epi64x(0, 0x0404040404040404, 0x0101010101010101, 0x0505050505050505)));
      hi = _mm256_or_si256(hi, high(_mm256_setr_epi64x(0x0202020202020202, 0x0606060606060606, 0x0303030303030303,
                                                       0x0707070707070707)));
    }
  }
}

// One activation row's pair, shared by every weight row: its halves, and c₀·Σx per int16 lane.
struct PairX {
  __m256i lo, hi, zero;
};

template <int BITS>
inline PairX load_pair_x(const int8_t* x) {
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
  const __m256i c0 = _mm256_set1_epi8(zero_code<BITS>());
  return {lo, hi, _mm256_add_epi16(_mm256_maddubs_epi16(c0, lo), _mm256_maddubs_epi16(c0, hi))};
}

// Eight int32 partial sums of (c − c₀)·x over the pair, in int16 until one widening: each VPMADDUBSW
// lane is at most 2·15·127 = 3810 for 4-bit codes, the two halves' sum 7620, so nothing saturates.
inline __m256i dot_pair(__m256i lo, __m256i hi, const PairX& x) {
  const __m256i cx = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x.lo), _mm256_maddubs_epi16(hi, x.hi));
  return _mm256_madd_epi16(_mm256_sub_epi16(cx, x.zero), _mm256_set1_epi16(1));
}

// count ≤ 8 float16 values as float32 lanes (the rest zero).
inline __m256 load_halves(const uint16_t* h, int64_t count) {
  if (count == 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
  alignas(16) uint16_t t[8] = {};
  std::memcpy(t, h, count * sizeof(uint16_t));
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}

// y[m, n] for R weight rows from n, two blocks per step (2, 3, 4 bits). Group size one block: the
// scales (and offsets) of four pairs are converted at once and each pair's lane multipliers s_j·d_b
// (and o_j) permuted out of them; larger groups (an even number of blocks) accumulate Σ cvt(c·xq)·d_b
// per group first and add Σ_j o_j X_j at the end.
template <int BITS, int M, int R>
inline void gemv_tile_pairs(const uint8_t* W, const uint16_t* S, const uint16_t* O, int64_t n, int64_t K,
                            int64_t group, const Activations& a, float* y, int64_t N) {
  constexpr int64_t bb = kBlock * BITS / 8;
  const int64_t nb = K / kBlock, np = nb / 2, bpg = group / kBlock, G = K / group;
  const int8_t* xz = a.qz.data();
  const float* dz = a.dz.data();
  prefetch_tile<BITS, R>(W, S, n, nb, G);
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  if (bpg == 1) {
    const __m256i lane_block = _mm256_setr_epi32(pair_lane_of<BITS>(0), pair_lane_of<BITS>(1), pair_lane_of<BITS>(2),
                                                 pair_lane_of<BITS>(3), pair_lane_of<BITS>(4), pair_lane_of<BITS>(5),
                                                 pair_lane_of<BITS>(6), pair_lane_of<BITS>(7));
    for (int64_t p0 = 0; p0 < np; p0 += 4) {
      const int64_t n4 = std::min<int64_t>(4, np - p0);
      __m256 s8[R], o8[R];
      for (int r = 0; r < R; ++r) {
        s8[r] = load_halves(S + (n + r) * G + 2 * p0, 2 * n4);
        if (O) o8[r] = load_halves(O + (n + r) * G + 2 * p0, 2 * n4);
      }
      for (int64_t q = 0; q < n4; ++q) {
        const int64_t p = p0 + q;
        const __m256i spread = _mm256_add_epi32(lane_block, _mm256_set1_epi32(static_cast<int>(2 * q)));
        PairX x[M];
        for (int m = 0; m < M; ++m) x[m] = load_pair_x<BITS>(xz + (m * np + p) * 2 * kBlock);
        for (int r = 0; r < R; ++r) {
          __m256i lo, hi;
          unpack_pair<BITS>(W + ((n + r) * nb + 2 * p) * bb, lo, hi);
          const __m256 s = _mm256_permutevar8x32_ps(s8[r], spread);
          for (int m = 0; m < M; ++m)
            acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_pair(lo, hi, x[m])),
                                        _mm256_mul_ps(s, _mm256_loadu_ps(dz + (m * np + p) * 8)), acc[r][m]);
          if (O) {  // the offset term o_b·X_b, in the same lanes
            const __m256 o = _mm256_permutevar8x32_ps(o8[r], spread);
            for (int m = 0; m < M; ++m)
              acc[r][m] = _mm256_fmadd_ps(o, _mm256_loadu_ps(a.xs.data() + (m * np + p) * 8), acc[r][m]);
          }
        }
      }
    }
  } else {
    for (int64_t j = 0; j < G; ++j) {
      __m256 g_acc[R][M];
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) g_acc[r][m] = _mm256_setzero_ps();
      for (int64_t p = j * bpg / 2; p < (j + 1) * bpg / 2; ++p) {
        PairX x[M];
        for (int m = 0; m < M; ++m) x[m] = load_pair_x<BITS>(xz + (m * np + p) * 2 * kBlock);
        for (int r = 0; r < R; ++r) {
          __m256i lo, hi;
          unpack_pair<BITS>(W + ((n + r) * nb + 2 * p) * bb, lo, hi);
          for (int m = 0; m < M; ++m)
            g_acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_pair(lo, hi, x[m])),
                                          _mm256_loadu_ps(dz + (m * np + p) * 8), g_acc[r][m]);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m256 s = _mm256_set1_ps(half_to_float(S[(n + r) * G + j]));
        for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(g_acc[r][m], s, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * N + n + r] = hsum(acc[r][m]) + (bpg == 1 ? 0.f : group_dot(O, n + r, G, a, m));
}

// Several activation rows (a batch of sequences) against one weight row n: the weight's codes are unpacked once
// per step for MC activation rows, each of which is read from L1 as it is used, so the registers hold the MC
// accumulators, the codes and the scale, and nothing spills. Per group j and activation row m:
//   acc_m += s_j · Σ_{pairs or blocks of j} cvt(Σ c·xq) · d,
// c the unsigned codes (a group of one block: s_b·d_b per lane); the zero code's −c₀·Σ_j s_j X_j and the offsets'
// Σ_j o_j X_j are added per row after the loop (row_terms). 8-bit codes are signed: |c| against sign(x, c), as
// llama.cpp's Q8_0 kernel does.
template <int BITS, int MC>
inline void panel_pairs(const uint8_t* W, const uint16_t* S, const uint16_t* O, int64_t n, int64_t m0, int64_t K,
                        int64_t group, const Activations& a, float* y, int64_t N) {
  constexpr int64_t bb = kBlock * BITS / 8;
  const int64_t nb = K / kBlock, np = nb / 2, bpg = group / kBlock, G = K / group;
  const uint8_t* w = W + n * nb * bb;
  const uint16_t* s_row = S + n * G;
  const int8_t* xz = a.qz.data() + m0 * K;
  const float* dz = a.dz.data() + m0 * np * kPairLanes;
  const __m256i ones = _mm256_set1_epi16(1);
  // cvt(Σ c·xq) per int32 lane of pair p, for activation row m
  const auto dot = [&](__m256i lo, __m256i hi, int64_t p, int m) {
    const int8_t* x = xz + (m * np + p) * 2 * kBlock;
    const __m256i cx = _mm256_add_epi16(
        _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
        _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(cx, ones));
  };
  const auto d = [&](int64_t p, int m) { return _mm256_loadu_ps(dz + (m * np + p) * kPairLanes); };
  __m256 acc[MC];
  for (int m = 0; m < MC; ++m) acc[m] = _mm256_setzero_ps();
  if (bpg == 1) {
    const __m256i lane_block = _mm256_setr_epi32(pair_lane_of<BITS>(0), pair_lane_of<BITS>(1), pair_lane_of<BITS>(2),
                                                 pair_lane_of<BITS>(3), pair_lane_of<BITS>(4), pair_lane_of<BITS>(5),
                                                 pair_lane_of<BITS>(6), pair_lane_of<BITS>(7));
    for (int64_t p = 0; p < np; ++p) {
      __m256i lo, hi;
      unpack_pair<BITS>(w + 2 * p * bb, lo, hi);
      const __m256 s = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(
          static_cast<int>(load_u32(reinterpret_cast<const uint8_t*>(s_row + 2 * p)))))), lane_block);
      for (int m = 0; m < MC; ++m) acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(dot(lo, hi, p, m), d(p, m)), s, acc[m]);
    }
  } else {
    const int64_t ppg = bpg / 2;
    for (int64_t j = 0; j < G; ++j) {
      __m256 g[MC];
      for (int m = 0; m < MC; ++m) g[m] = _mm256_setzero_ps();
      for (int64_t p = j * ppg; p < (j + 1) * ppg; ++p) {
        __m256i lo, hi;
        unpack_pair<BITS>(w + 2 * p * bb, lo, hi);
        for (int m = 0; m < MC; ++m) g[m] = _mm256_fmadd_ps(dot(lo, hi, p, m), d(p, m), g[m]);
      }
      const __m256 s = _mm256_set1_ps(half_to_float(s_row[j]));
      for (int m = 0; m < MC; ++m) acc[m] = _mm256_fmadd_ps(g[m], s, acc[m]);
    }
  }
  for (int m = 0; m < MC; ++m) y[(m0 + m) * N + n] = hsum(acc[m]) + row_terms<BITS>(S, O, n, G, a, m0 + m);
}

template <int BITS, int MC>
inline void panel_blocks(const uint8_t* W, const uint16_t* S, const uint16_t* O, int64_t n, int64_t m0, int64_t K,
                         int64_t group, const Activations& a, float* y, int64_t N) {
  constexpr int64_t bb = kBlock * BITS / 8;
  const int64_t nb = K / kBlock, bpg = group / kBlock, G = K / group;
  const uint8_t* w = W + n * nb * bb;
  const int8_t* xq = a.q.data() + m0 * K;
  const float* d = a.d.data() + m0 * nb;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MC];
  for (int m = 0; m < MC; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t j = 0; j < G; ++j) {
    __m256 g[MC];
    for (int m = 0; m < MC; ++m) g[m] = _mm256_setzero_ps();
    for (int64_t b = j * bpg; b < (j + 1) * bpg; ++b) {
      const __m256i c = unpack_block<BITS>(w + b * bb);
      const __m256i u = BITS == 8 ? _mm256_sign_epi8(c, c) : c;
      for (int m = 0; m < MC; ++m) {
        __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + b * kBlock));
        if constexpr (BITS == 8) x = _mm256_sign_epi8(x, c);
        g[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones)),
                               _mm256_broadcast_ss(d + m * nb + b), g[m]);
      }
    }
    const __m256 s = _mm256_set1_ps(half_to_float(S[n * G + j]));
    for (int m = 0; m < MC; ++m) acc[m] = _mm256_fmadd_ps(g[m], s, acc[m]);
  }
  for (int m = 0; m < MC; ++m) y[(m0 + m) * N + n] = hsum(acc[m]) + row_terms<BITS>(S, O, n, G, a, m0 + m);
}

constexpr int kPanelRows = 4;  // activation rows per panel step: MC accumulators and the codes fit the 16 registers
static_assert(kPanelRows == 4, "gemv_panels' remainder switch takes 1 … 3 rows");

template <int BITS, int MC>
inline void panel(bool pairs, const uint8_t* W, const uint16_t* S, const uint16_t* O, int64_t n, int64_t m0,
                  int64_t K, int64_t group, const Activations& a, float* y, int64_t N) {
  if (pairs) panel_pairs<BITS, MC>(W, S, O, n, m0, K, group, a, y, N);
  else panel_blocks<BITS, MC>(W, S, O, n, m0, K, group, a, y, N);
}

// y[m, n] for every activation row and the weight rows n of [n0, n1): each weight row is read once from memory
// and stays in L1 while the activation rows pass over it kPanelRows at a time.
template <int BITS>
void gemv_panels(int64_t M, const uint8_t* W, const uint16_t* S, const uint16_t* O, int64_t n0, int64_t n1,
                 int64_t K, int64_t group, const Activations& a, float* y, int64_t N) {
  const bool pairs = BITS != 8 && pairs_fit(BITS, K, group);
  const int64_t full = M - M % kPanelRows;
  for (int64_t n = n0; n < n1; ++n) {
    if (n + 1 < n1) prefetch_tile<BITS, 1>(W, S, n, K / kBlock, K / group);
    for (int64_t m0 = 0; m0 < full; m0 += kPanelRows)
      panel<BITS, kPanelRows>(pairs, W, S, O, n, m0, K, group, a, y, N);
    switch (M - full) {
      case 3: panel<BITS, 3>(pairs, W, S, O, n, full, K, group, a, y, N); break;
      case 2: panel<BITS, 2>(pairs, W, S, O, n, full, K, group, a, y, N); break;
      case 1: panel<BITS, 1>(pairs, W, S, O, n, full, K, group, a, y, N); break;
      default: break;
    }
  }
}
#endif

// y[m, n] for the weight rows n of [n0, n1).
template <int BITS, int M>
void gemv_rows(const uint8_t* W, const uint16_t* S, const uint16_t* O, int64_t n0, int64_t n1, int64_t K,
               int64_t group, const Activations& a, float* y, int64_t N) {
  constexpr int R = tile_rows(M);
  int64_t n = n0;
  if constexpr (BITS != 8 || kPairs8Bit) {
    if (pairs_fit(BITS, K, group)) {
      for (; n + R <= n1; n += R) gemv_tile_pairs<BITS, M, R>(W, S, O, n, K, group, a, y, N);
      for (; n < n1; ++n) gemv_tile_pairs<BITS, M, 1>(W, S, O, n, K, group, a, y, N);
      return;
    }
  }
  for (; n + R <= n1; n += R) gemv_tile<BITS, M, R>(W, S, O, n, K, group, a, y, N);
  for (; n < n1; ++n) gemv_tile<BITS, M, 1>(W, S, O, n, K, group, a, y, N);
}
#else
constexpr bool kRowPanels = false;

// y[m, n] for the weight rows n of [n0, n1).
template <int BITS, int M>
void gemv_rows(const uint8_t* W, const uint16_t* S, const uint16_t* O, int64_t n0, int64_t n1, int64_t K,
               int64_t group, const Activations& a, float* y, int64_t N) {
  constexpr int64_t bb = kBlock * BITS / 8;
  const int64_t nb = K / kBlock, bpg = group / kBlock, G = K / group;
  uint8_t c[kBlock];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = W + n * nb * bb;
    float acc[M] = {};
    for (int64_t j = 0; j < G; ++j) {
      float g_acc[M] = {};
      for (int64_t b = j * bpg; b < (j + 1) * bpg; ++b) {
        unpack_block_scalar<BITS>(row + b * bb, c);
        for (int m = 0; m < M; ++m) {
          const int8_t* x = a.q.data() + m * K + b * kBlock;
          int32_t dot = 0;
          for (int i = 0; i < kBlock; ++i)
            dot += (BITS == 8 ? static_cast<int32_t>(static_cast<int8_t>(c[i])) : static_cast<int32_t>(c[i])) * x[i];
          g_acc[m] += static_cast<float>(dot) * a.d[m * nb + b];
        }
      }
      const float s = half_to_float(S[n * G + j]);
      for (int m = 0; m < M; ++m) acc[m] += g_acc[m] * s;
    }
    for (int m = 0; m < M; ++m)
      y[m * N + n] = acc[m] + row_terms<BITS>(S, O, n, G, a, m);
  }
}
#endif

// The per-call activation layout the chosen kernel reads: block pairs, or broadcast d_b (one block per step).
void arrange_for_kernel(int64_t bits, int64_t group, bool offsets, Activations& a) {
#if defined(__AVX2__)
  if (pairs_fit(bits, a.K, group)) {
    switch (bits) {
      case 2: return arrange_pairs<2>(a, offsets);
      case 3: return arrange_pairs<3>(a, offsets);
      case 4: return arrange_pairs<4>(a, offsets);
      default: return arrange_pairs<8>(a, offsets);
    }
  }
  a.dv.resize(a.d.size() * 8);
  for (size_t i = 0; i < a.d.size(); ++i) _mm256_storeu_ps(a.dv.data() + 8 * i, _mm256_set1_ps(a.d[i]));
#endif
  (void)bits, (void)group, (void)offsets;
}

template <int BITS>
void gemv_panels(int64_t M, const uint8_t* W, const uint16_t* S, const uint16_t* O, int64_t n0, int64_t n1,
                 int64_t K, int64_t group, const Activations& a, float* y, int64_t N);

template <int BITS>
void gemv_dispatch_rows(int64_t M, const uint8_t* W, const uint16_t* S, const uint16_t* O, int64_t n0, int64_t n1,
                        int64_t K, int64_t group, const Activations& a, float* y, int64_t N) {
  if constexpr (kRowPanels) {
    if (M > 1) return gemv_panels<BITS>(M, W, S, O, n0, n1, K, group, a, y, N);
  }
  static_assert(kMaxRows == 8, "the switch below instantiates 1 … 8 rows");
  switch (M) {
    case 1: return gemv_rows<BITS, 1>(W, S, O, n0, n1, K, group, a, y, N);
    case 2: return gemv_rows<BITS, 2>(W, S, O, n0, n1, K, group, a, y, N);
    case 3: return gemv_rows<BITS, 3>(W, S, O, n0, n1, K, group, a, y, N);
    case 4: return gemv_rows<BITS, 4>(W, S, O, n0, n1, K, group, a, y, N);
    case 5: return gemv_rows<BITS, 5>(W, S, O, n0, n1, K, group, a, y, N);
    case 6: return gemv_rows<BITS, 6>(W, S, O, n0, n1, K, group, a, y, N);
    case 7: return gemv_rows<BITS, 7>(W, S, O, n0, n1, K, group, a, y, N);
    default: return gemv_rows<BITS, 8>(W, S, O, n0, n1, K, group, a, y, N);
  }
}

// Rows [n0, n1) of w = s·(c − c₀) + o, written to out [n1 − n0, K].
template <int BITS>
void dequantize_rows(const uint8_t* W, const uint16_t* S, const uint16_t* O, int64_t n0, int64_t n1, int64_t K,
                     int64_t group, float* out) {
  constexpr int64_t bb = kBlock * BITS / 8;
  const int64_t nb = K / kBlock, bpg = group / kBlock, G = K / group;
  uint8_t c[kBlock];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t j = b / bpg;
      const float s = half_to_float(S[n * G + j]), o = O ? half_to_float(O[n * G + j]) : 0.f;
      unpack_block_scalar<BITS>(W + (n * nb + b) * bb, c);
      float* w = out + (n - n0) * K + b * kBlock;
      for (int i = 0; i < kBlock; ++i)
        w[i] = s * (BITS == 8 ? static_cast<float>(static_cast<int8_t>(c[i]))
                              : static_cast<float>(static_cast<int>(c[i]) - zero_code<BITS>())) + o;
    }
  }
}

}  // namespace

void check_packed(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& offset,
                  int64_t bits, int64_t group, int64_t K) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  TORCH_CHECK(K % kBlock == 0 && group % kBlock == 0 && K % group == 0,
              "K and the group size must be multiples of ", kBlock, ", the group size dividing K");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2 &&
                  packed.size(1) == K * bits / 8,
              "packed: contiguous uint8 [N, K·bits/8]");
  const int64_t N = packed.size(0);
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.numel() == N * (K / group),
              "scale: contiguous float16 [N, K/group]");
  if (offset)
    TORCH_CHECK(offset->scalar_type() == at::kHalf && offset->is_contiguous() && offset->numel() == scale.numel(),
                "offset: contiguous float16 like scale");
}

void packed_gemv(const float* x, int64_t M, int64_t K, const PackedWeight& w, float* y) {
  if (!kRowPanels && M > kMaxRows) {  // the row-templated kernels take kMaxRows at a time
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)
      packed_gemv(x + m0 * K, std::min<int64_t>(kMaxRows, M - m0), K, w, y + m0 * w.N);
    return;
  }
  thread_local Activations reused;  // no allocation per call once warm
  Activations& a = reused;          // the workers below must read the caller's copy, not their own
  quantize_activations(x, M, K, w.group, a);
  arrange_for_kernel(w.bits, w.group, w.offset != nullptr, a);
  const int64_t N = w.N;
  const uint8_t* W = w.packed;
  const uint16_t *S = w.scale, *O = w.offset;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    switch (w.bits) {
      case 2: return gemv_dispatch_rows<2>(M, W, S, O, n0, n1, K, w.group, a, y, N);
      case 3: return gemv_dispatch_rows<3>(M, W, S, O, n0, n1, K, w.group, a, y, N);
      case 4: return gemv_dispatch_rows<4>(M, W, S, O, n0, n1, K, w.group, a, y, N);
      default: return gemv_dispatch_rows<8>(M, W, S, O, n0, n1, K, w.group, a, y, N);
    }
  });
}

PackedWeight packed_view(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& offset,
                         int64_t bits, int64_t group, int64_t K) {
  check_packed(packed, scale, offset, bits, group, K);
  return PackedWeight{packed.data_ptr<uint8_t>(),
                      reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>()),
                      offset ? reinterpret_cast<const uint16_t*>(offset->data_ptr<at::Half>()) : nullptr,
                      packed.size(0), K, bits, group};
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                const c10::optional<at::Tensor>& offset, int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(x.size(0) >= 1, "gemv takes at least one row");
  const int64_t K = x.size(1);
  const PackedWeight w = packed_view(packed, scale, offset, bits, group, K);
  at::Tensor y = at::empty({x.size(0), w.N}, x.options());
  packed_gemv(x.data_ptr<float>(), x.size(0), K, w, y.data_ptr<float>());
  return y;
}

void dequantize_range(const PackedWeight& w, int64_t n0, int64_t n1, float* out) {
  switch (w.bits) {
    case 2: return dequantize_rows<2>(w.packed, w.scale, w.offset, n0, n1, w.K, w.group, out);
    case 3: return dequantize_rows<3>(w.packed, w.scale, w.offset, n0, n1, w.K, w.group, out);
    case 4: return dequantize_rows<4>(w.packed, w.scale, w.offset, n0, n1, w.K, w.group, out);
    default: return dequantize_rows<8>(w.packed, w.scale, w.offset, n0, n1, w.K, w.group, out);
  }
}

at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& offset,
                      int64_t bits, int64_t group, int64_t K, at::ScalarType dtype) {
  const PackedWeight w = packed_view(packed, scale, offset, bits, group, K);
  at::Tensor out = at::empty({w.N, K}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, w.N, 16, [&](int64_t n0, int64_t n1) { dequantize_range(w, n0, n1, o + n0 * K); });
  return dtype == at::kFloat ? out : out.to(dtype);
}

const char* isa_name() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}

}  // namespace lowbit
