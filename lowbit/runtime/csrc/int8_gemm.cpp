// lowbit's int8 × int8 GEMM with int32 accumulation (W8A8), for decode and prefill alike.
//
//   y[m, n] = s_x[m] · s_w[n] · Σ_k q_x[m, k] q_w[n, k]
//
// q_w: the checkpoint's int8 weights (per-channel scale s_w, any value in [−128, 127]); q_x: the input
// quantized on the fly as lowbit.schemes.activations does (q = clamp(round(x / s), ±127), s = max|x| / 127
// per row, per call, or a calibrated static scale), so the integers are those evaluation fake-quantizes.
//
// Weights are packed once into panels of kNr = 8 rows × kKc = 4 columns: panel p, chunk c holds the 32 bytes
// w[8p + r, 4c + j] at r·4 + j (zero padding past N and K). One step multiplies a chunk by four columns of
// an input row broadcast to all lanes: u = |w| (≤ 128, unsigned) times s = q_x · sign(w) (|s| ≤ 127), so the
// u8 × s8 products never saturate VPMADDUBSW's int16 pair sums; VPDPBUSD (AVX-512 VNNI) takes the same bytes.
// Without VNNI, prefill (more than kWideRows input rows) widens both sides to int16 and runs VPMADDWD
// (16 products per instruction, no sign step: about 1.25x the u8 × s8 kernel on Zen 3); each panel pair is
// widened once per call, so no int16 copy of the weights is kept.
// Each ISA computes the same integers.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "int8_gemm.h"
#include "simd.h"

namespace lowbit {

namespace {

constexpr int64_t kNr = 8, kKc = 4, kMr = 4, kWideRows = 8;
#if defined(__AVX2__) && !(defined(__AVX512VNNI__) && defined(__AVX512VL__))
constexpr bool kWiden = true;
#else
constexpr bool kWiden = false;
#endif
constexpr float kQmax = 127.f, kMinScale = 1e-12f;

inline int64_t chunks_of(int64_t K) { return (K + kKc - 1) / kKc; }
inline int64_t panels_of(int64_t N) { return (N + kNr - 1) / kNr; }

inline float row_amax(const float* x, int64_t K) {
  float amax = 0.f;
#pragma omp simd reduction(max : amax)
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  return amax;
}

// q [Kp] = clamp(round(x / s), ±127), zero past K; x / s divided (not multiplied by 1/s) as PyTorch does.
void quantize_row(const float* x, int64_t K, float s, int8_t* q, int64_t Kp) {
  int64_t k = 0;
#if defined(__AVX2__)
  const __m256 sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-kQmax), hi = _mm256_set1_ps(kQmax);
  for (; k + 8 <= K; k += 8) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i v = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(w, w));
  }
#endif
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::min(kQmax, std::max(-kQmax, std::nearbyint(x[k] / s))));
  for (; k < Kp; ++k) q[k] = 0;
}

// The scale of each row, then q [M, Kp].
void quantize_input(const float* x, int64_t M, int64_t K, InputScale how, std::vector<int8_t>& q,
                    std::vector<float>& s) {
  const int64_t Kp = chunks_of(K) * kKc;
  q.resize(M * Kp), s.resize(M);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) s[m] = row_amax(x + m * K, K);
  });
  if (how.fixed > 0.f) {
    std::fill(s.begin(), s.end(), how.fixed);
  } else {
    float amax = how.per_tensor ? *std::max_element(s.begin(), s.end()) : 0.f;
    for (float& v : s) v = std::max((how.per_tensor ? amax : v) / kQmax, kMinScale);
  }
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_row(x + m * K, K, s[m], q.data() + m * Kp, Kp);
  });
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// acc [MR][NP·8] = Σ_k x[m, k] w[n, k] for MR input rows and NP consecutive panels.
template <int MR, int NP>
inline void tile(const int8_t* x, int64_t Kp, const int8_t* W, int64_t panel_bytes, int64_t chunks, int32_t* acc) {
#if defined(__AVX2__)
  __m256i a[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NP; ++j) a[m][j] = _mm256_setzero_si256();
  for (int64_t c = 0; c < chunks; ++c) {
    __m256i w[NP], u[NP];
    for (int j = 0; j < NP; ++j) {
      w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + j * panel_bytes + c * kNr * kKc));
      u[j] = _mm256_abs_epi8(w[j]);
    }
    for (int m = 0; m < MR; ++m) {
      const __m256i xb = _mm256_set1_epi32(load_i32(x + m * Kp + c * kKc));
      for (int j = 0; j < NP; ++j) a[m][j] = dot_u8s8_acc(a[m][j], u[j], _mm256_sign_epi8(xb, w[j]));
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NP; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + m * NP * kNr + j * kNr), a[m][j]);
#else
  std::fill(acc, acc + MR * NP * kNr, 0);
  for (int j = 0; j < NP; ++j)
    for (int64_t c = 0; c < chunks; ++c) {
      const int8_t* wc = W + j * panel_bytes + c * kNr * kKc;
      for (int m = 0; m < MR; ++m) {
        const int8_t* xc = x + m * Kp + c * kKc;
        for (int r = 0; r < kNr; ++r) {
          int32_t t = 0;
          for (int i = 0; i < kKc; ++i) t += static_cast<int32_t>(wc[r * kKc + i]) * xc[i];
          acc[m * NP * kNr + j * kNr + r] += t;
        }
      }
    }
#endif
}

#if defined(__AVX2__)
// The int16 form of the same tile: x16 [MR rows, Kp] and w16 [NP panels][Kp / 2][kNr][2], one VPMADDWD per
// two columns of eight rows.
template <int MR, int NP>
inline void tile16(const int16_t* x, int64_t Kp, const int16_t* W, int32_t* acc) {
  const int64_t pairs = Kp / 2, panel = pairs * kNr * 2;
  __m256i a[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NP; ++j) a[m][j] = _mm256_setzero_si256();
  for (int64_t c = 0; c < pairs; ++c) {
    __m256i w[NP];
    for (int j = 0; j < NP; ++j) w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + j * panel + c * kNr * 2));
    for (int m = 0; m < MR; ++m) {
      int32_t v;
      std::memcpy(&v, x + m * Kp + 2 * c, 4);
      const __m256i xb = _mm256_set1_epi32(v);
      for (int j = 0; j < NP; ++j) a[m][j] = _mm256_add_epi32(a[m][j], _mm256_madd_epi16(xb, w[j]));
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NP; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + m * NP * kNr + j * kNr), a[m][j]);
}

// Panels [p, p + np) widened to w16 [np][Kp / 2][kNr][2]: chunk c, row r (k0 … k3) → pairs 2c, 2c + 1.
inline void widen_panels(const int8_t* W, int64_t chunks, int64_t np, int16_t* w16) {
  for (int64_t j = 0; j < np; ++j)
    for (int64_t c = 0; c < chunks; ++c) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + (j * chunks + c) * kNr * kKc));
      // int16 lanes hold rows 0–3 (lo) and 4–7 (hi), four columns each; gather each row's (k0, k1) and
      // (k2, k3) pairs, then interleave the two halves' 64-bit units back into row order 0 … 7.
      const __m256i lo = _mm256_shuffle_epi32(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(b)), 0xD8);
      const __m256i hi = _mm256_shuffle_epi32(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(b, 1)), 0xD8);
      int16_t* out = w16 + (j * chunks * 2 + 2 * c) * kNr * 2;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(_mm256_unpacklo_epi64(lo, hi), 0xD8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + kNr * 2),
                          _mm256_permute4x64_epi64(_mm256_unpackhi_epi64(lo, hi), 0xD8));
    }
}
#endif

// Where a tile's integers come from: the int8 panels, or their int16 widening (w16 holds panels from p16).
struct Source {
  const int8_t* q;       // [M, Kp]
  const int16_t* x16;    // [M, Kp], or null
  const int16_t* w16;    // [2][Kp / 2][kNr][2], or null
  int64_t Kp, p16;
};

// y rows [m, m + MR) × panels [p, p + NP): the integer tile, then y = acc · s_x · s_w.
template <int MR, int NP>
inline void tile_out(const Source& src, const float* sx, int64_t m, const Int8Weight& w, int64_t p, float* y) {
  const int64_t Kp = src.Kp, chunks = Kp / kKc, panel_bytes = chunks * kNr * kKc;
  alignas(32) int32_t acc[MR * NP * kNr];
#if defined(__AVX2__)
  if (src.w16) tile16<MR, NP>(src.x16 + m * Kp, Kp, src.w16 + (p - src.p16) * Kp * kNr, acc);
  else
#endif
    tile<MR, NP>(src.q + m * Kp, Kp, w.panels + p * panel_bytes, panel_bytes, chunks, acc);
  for (int i = 0; i < MR; ++i)
    for (int64_t t = 0; t < NP * kNr; ++t) {
      const int64_t n = p * kNr + t;
      if (n < w.N) y[(m + i) * w.N + n] = static_cast<float>(acc[i * NP * kNr + t]) * sx[m + i] * w.scale[n];
    }
}

template <int NP>
inline void rows_out(const Source& src, const float* sx, int64_t M, const Int8Weight& w, int64_t p, float* y) {
  int64_t m = 0;
  for (; m + kMr <= M; m += kMr) tile_out<kMr, NP>(src, sx, m, w, p, y);
  switch (M - m) {
    case 3: return tile_out<3, NP>(src, sx, m, w, p, y);
    case 2: return tile_out<2, NP>(src, sx, m, w, p, y);
    case 1: return tile_out<1, NP>(src, sx, m, w, p, y);
    default: return;
  }
}

}  // namespace

Int8Weight int8_view(const at::Tensor& panels, const at::Tensor& scale, int64_t K) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 1, "scale: float32 [N]");
  const int64_t N = scale.size(0);
  TORCH_CHECK(panels.scalar_type() == at::kChar && panels.is_contiguous() &&
                  panels.numel() == panels_of(N) * chunks_of(K) * kNr * kKc,
              "panels: int8 from int8_pack for this [N, K]");
  return Int8Weight{panels.data_ptr<int8_t>(), scale.data_ptr<float>(), N, K};
}

void int8_linear(const float* x, int64_t M, const Int8Weight& w, InputScale how, float* y) {
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> sx;
  thread_local std::vector<int16_t> x16;
  std::vector<int8_t>& qr = q;  // the workers read the caller's buffers, not their own
  std::vector<float>& sr = sx;
  quantize_input(x, M, w.K, how, qr, sr);
  const int64_t Kp = chunks_of(w.K) * kKc, P = panels_of(w.N), pairs = (P + 1) / 2;
  const bool wide = kWiden && M > kWideRows;
  if (wide) x16.assign(qr.begin(), qr.end());
  const int16_t* x16p = x16.data();
  at::parallel_for(0, pairs, 1, [&](int64_t b, int64_t e) {
    std::vector<int16_t> w16(wide ? 2 * Kp * kNr : 0);
    for (int64_t pair = b; pair < e; ++pair) {
      const int64_t p = 2 * pair, np = std::min<int64_t>(2, P - p);
      Source src{qr.data(), nullptr, nullptr, Kp, p};
#if defined(__AVX2__)
      if (wide) {
        widen_panels(w.panels + p * Kp * kNr, Kp / kKc, np, w16.data());
        src.x16 = x16p, src.w16 = w16.data();
      }
#endif
      if (np == 2) rows_out<2>(src, sr.data(), M, w, p, y);
      else rows_out<1>(src, sr.data(), M, w, p, y);
    }
  });
}

at::Tensor int8_pack(const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar, "q: int8 [N, K]");
  const at::Tensor src = q.contiguous();
  const int64_t N = src.size(0), K = src.size(1), C = chunks_of(K);
  at::Tensor out = at::zeros({panels_of(N), C, kNr, kKc}, src.options());
  const int8_t* s = src.data_ptr<int8_t>();
  int8_t* o = out.data_ptr<int8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) o[((n / kNr * C + k / kKc) * kNr + n % kNr) * kKc + k % kKc] = s[n * K + k];
  return out;
}

at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& scale, int64_t K,
                     bool per_tensor, double static_scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) == K,
              "x: contiguous float32 [M, K]");
  const Int8Weight w = int8_view(panels, scale, K);
  at::Tensor y = at::empty({x.size(0), w.N}, x.options());
  if (x.size(0) > 0)
    int8_linear(x.data_ptr<float>(), x.size(0), w, InputScale{per_tensor, static_cast<float>(static_scale)},
                y.data_ptr<float>());
  return y;
}

std::tuple<at::Tensor, at::Tensor> int8_quantize_rows(const at::Tensor& x, bool per_tensor, double static_scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), Kp = chunks_of(K) * kKc;
  std::vector<int8_t> q;
  std::vector<float> s;
  quantize_input(x.data_ptr<float>(), M, K, InputScale{per_tensor, static_cast<float>(static_scale)}, q, s);
  at::Tensor qt = at::empty({M, Kp}, at::TensorOptions().dtype(at::kChar));
  std::memcpy(qt.data_ptr<int8_t>(), q.data(), q.size());
  at::Tensor st = at::empty({M, 1}, x.options());
  std::memcpy(st.data_ptr<float>(), s.data(), s.size() * sizeof(float));
  return {qt.narrow(1, 0, K).contiguous(), st};
}

}  // namespace lowbit
