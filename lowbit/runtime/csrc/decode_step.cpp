// One decode step of a Llama-style decoder in a single call (gpt-fast's lean loop, without Python).
//
// For token t at position p, with the residual stream h kept in float32 (as the PyTorch path keeps it):
//   h = E[t] · embed_scale
//   for each block:  x = RMSNorm(h) * w_attn;  [q k v] = x W_qkvᵀ (+ b);  (q, k = RMSNorm per head)
//                    q, k = RoPE_p(q, k) (the block's table);  K[p], V[p] = k, v
//                    a_h = softmax(scale · q_h · K_{s..p}ᵀ) V_{s..p}   (s = p − window + 1 in a windowed block, else 0;
//                                                                      head h reads kv head h / (H / H_kv))
//                    h += post(a W_oᵀ);  x = RMSNorm(h) * w_mlp;  [g u] = x W_guᵀ;  h += post((act(g) ⊙ u) W_downᵀ)
//   logits = (RMSNorm(h) * w_final) W_headᵀ
// post is the identity, or an RMSNorm where the family normalises block outputs (Gemma); act is SiLU or GELU-tanh.
// A projection is lowbit's packed kernel (qgemv.cpp, float32 in and out), a dense GEMV in the weight's
// dtype, or a Python callable for anything else, so no layer keeps the whole step from running here.
// The KV cache holds float32 or bfloat16 rows, or int8 / FP8 E4M3 codes with a float16 scale per position and
// head (or, FP8, one static scale per layer), stored exactly as lowbit.schemes.kv_cache.quantize_tokens computes
// them; or int4 KIVI codes (keys per channel over groups of G positions, values per position, the incomplete group
// in a bfloat16 residual), quantized as lowbit.schemes.kv_cache.quantize_asymmetric computes them. Attention reads
// the codes directly (no dequantized copy) and accumulates in float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "int8_gemm.h"
#include "qgemv.h"
#include "simd.h"

namespace {

using at::Tensor;

enum Kind : int64_t {
  kDense = LOWBIT_KIND_DENSE,
  kPacked = LOWBIT_KIND_PACKED,
  kCallback = LOWBIT_KIND_CALLBACK,
  kInt8 = LOWBIT_KIND_INT8
};

std::vector<float> to_floats(const Tensor& t) {
  Tensor f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

// y [N] = W x [K] (+ b), float32 in and out.
class Projection {
 public:
  static std::shared_ptr<Projection> packed(Tensor packed, Tensor scale, c10::optional<Tensor> offset, int64_t bits,
                                            int64_t group, int64_t in_features, c10::optional<Tensor> bias) {
    auto p = std::make_shared<Projection>();
    p->kind_ = kPacked;
    p->tensors_ = {packed, scale};
    if (offset) p->tensors_.push_back(*offset);
    p->view_ = lowbit::packed_view(packed, scale, offset, bits, group, in_features);
    p->N_ = p->view_.N, p->K_ = in_features;
    p->set_bias(bias);
    return p;
  }

  static std::shared_ptr<Projection> dense(Tensor weight, c10::optional<Tensor> bias) {
    TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "dense weight: contiguous [N, K]");
    auto p = std::make_shared<Projection>();
    p->kind_ = kDense;
    p->tensors_ = {weight};
    p->N_ = weight.size(0), p->K_ = weight.size(1);
    p->set_bias(bias);
    return p;
  }

  // W8A8: int8 panels (int8_pack) and float32 row scales; the input quantized per token, or with a static scale.
  static std::shared_ptr<Projection> int8(Tensor panels, Tensor scale, int64_t in_features, double static_scale,
                                          c10::optional<Tensor> bias) {
    auto p = std::make_shared<Projection>();
    p->kind_ = kInt8;
    p->tensors_ = {panels, scale};
    p->int8_ = lowbit::int8_view(panels, scale, in_features);
    p->input_.fixed = static_cast<float>(static_scale);
    p->N_ = p->int8_.N, p->K_ = in_features;
    p->set_bias(bias);
    return p;
  }

  static std::shared_ptr<Projection> callback(pybind11::function fn, int64_t in_features, int64_t out_features) {
    auto p = std::make_shared<Projection>();
    p->kind_ = kCallback;
    p->fn_ = std::move(fn);
    p->N_ = out_features, p->K_ = in_features;
    return p;
  }

  ~Projection() {
    if (fn_) {
      pybind11::gil_scoped_acquire gil;
      fn_ = pybind11::function();
    }
  }

  // y [M, N] = x [M, K] Wᵀ (+ bias), each row as it would be alone: int8 inputs scaled per row, packed ones per
  // block of each row, a Python callback called once per row (its own dynamic scales stay per sequence).
  void operator()(const float* x, float* y, int64_t M = 1) const {
    if (kind_ == kPacked) {
      lowbit::packed_gemv(x, M, K_, view_, y);
    } else if (kind_ == kInt8) {
      lowbit::int8_linear(x, M, int8_, input_, y);
    } else if (kind_ == kDense) {
      const Tensor& w = tensors_[0];
      Tensor xt = at::from_blob(const_cast<float*>(x), {M, K_}, at::kFloat).to(w.scalar_type());
      copy_out(at::linear(xt, w), y, M);
    } else {
      pybind11::gil_scoped_acquire gil;
      for (int64_t r = 0; r < M; ++r) {
        Tensor xt = at::from_blob(const_cast<float*>(x + r * K_), {1, K_}, at::kFloat).clone();
        copy_out(fn_(xt).cast<Tensor>(), y + r * N_, 1);
      }
    }
    if (!bias_.empty())
      for (int64_t r = 0; r < M; ++r)
        for (int64_t j = 0; j < N_; ++j) y[r * N_ + j] += bias_[j];
  }

  // Row n of the weight as float32 (the embedding of a tied packed head).
  void row(int64_t n, float* out) const {
    TORCH_CHECK(kind_ == kPacked, "only a packed projection lends its rows to the embedding");
    lowbit::dequantize_range(view_, n, n + 1, out);
  }

  int64_t kind() const { return kind_; }
  int64_t out_features() const { return N_; }
  int64_t in_features() const { return K_; }

 private:
  void set_bias(const c10::optional<Tensor>& bias) {
    if (bias) bias_ = to_floats(*bias);
  }

  void copy_out(const Tensor& r, float* y, int64_t M) const {
    Tensor f = r.to(at::kFloat).contiguous();
    TORCH_CHECK(f.numel() == M * N_, "projection returned ", f.numel(), " values, expected ", M * N_);
    std::memcpy(y, f.data_ptr<float>(), M * N_ * sizeof(float));
  }

  int64_t kind_ = kDense, N_ = 0, K_ = 0;
  std::vector<Tensor> tensors_;  // keeps the weights alive behind view_
  lowbit::PackedWeight view_{};
  lowbit::Int8Weight int8_{};
  lowbit::InputScale input_{};
  pybind11::function fn_;
  std::vector<float> bias_;
};

using ProjectionPtr = std::shared_ptr<Projection>;

struct Block {
  ProjectionPtr qkv, o, gate_up, down;
  std::vector<float> norm_attn, norm_mlp, q_norm, k_norm, post_attn, post_mlp;  // empty: none
  int64_t window = 0;  // 0: every earlier position
  int64_t rope = 0;    // which RoPE table
};

enum Activation : int64_t { kSilu = 0, kGeluTanh = 1 };

void rms_norm(const float* x, const float* w, int64_t n, double eps, float* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / n + static_cast<float>(eps));
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

inline float to_float(float v) { return v; }
inline float to_float(int8_t v) { return static_cast<float>(v); }
inline float to_float(at::Float8_e4m3fn v) { return static_cast<float>(v); }
inline float to_float(at::BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;  // a shift: keeps the loops below vectorisable
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Attention's row operations on a float32 or bfloat16 cache row of d values: q·k and o += w·v.
// Vectorised by hand (bfloat16 → float32 is a 16-bit shift), with a scalar tail.
// E4M3 → float16 bits: sign to bit 15, exponent and mantissa shifted under float16's; the float16 value is then
// the E4M3 value / 2⁸ (both biases differ by 8), subnormals included, so one multiply by 256 restores it.
constexpr float kFp8FromHalf = 256.f;
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
inline __m512 load_row(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_row(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load_row(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load_row(const at::Float8_e4m3fn* p) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                    _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7));
  return _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(kFp8FromHalf));
}
#elif defined(__AVX2__)
constexpr int64_t kLanes = 8;
inline __m256 load_row(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_row(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load_row(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load_row(const at::Float8_e4m3fn* p) {
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                                 _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7));
  return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(kFp8FromHalf));
}
#endif

// One position's row of d values as the cache stores it: a cast, or int8 / E4M3 codes of x / s, with s the
// float16 max|x| / Q (Q = 127 or 448; floored at float16's smallest normal) or the layer's static scale.
constexpr float kScaleFloor = 6.103515625e-05f;  // 2^-14
inline void store_row(const float* x, float* dst, at::Half*, float, int64_t d) { std::copy(x, x + d, dst); }
inline void store_row(const float* x, at::BFloat16* dst, at::Half*, float, int64_t d) {
  for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<at::BFloat16>(x[j]);
}
inline float code_scale(const float* x, at::Half* scale, float static_scale, int64_t d, float q_max) {
  if (!scale) return static_scale;
  float amax = 0.f;
  for (int64_t j = 0; j < d; ++j) amax = std::max(amax, std::abs(x[j]));
  *scale = static_cast<at::Half>(std::min(std::max(amax / q_max, kScaleFloor), 65504.f));
  return static_cast<float>(*scale);
}
inline void store_row(const float* x, int8_t* dst, at::Half* scale, float static_scale, int64_t d) {
  const float s = code_scale(x, scale, static_scale, d, 127.f);
  for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(x[j] / s))));
}
inline void store_row(const float* x, at::Float8_e4m3fn* dst, at::Half* scale, float static_scale, int64_t d) {
  const float s = code_scale(x, scale, static_scale, d, 448.f);
  for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<at::Float8_e4m3fn>(std::min(448.f, std::max(-448.f, x[j] / s)));
}
// A row of d values as nb blocks of d / nb, each with its own scale scale[b] (nb = 1: store_row).
template <typename T>
inline void store_blocks(const float* x, T* dst, at::Half* scale, float static_scale, int64_t d, int64_t nb) {
  const int64_t B = d / nb;
  for (int64_t b = 0; b < nb; ++b) store_row(x + b * B, dst + b * B, scale ? scale + b : nullptr, static_scale, B);
}

// int4 codes two per byte (byte i = c[2i] | c[2i + 1] << 4), read as a row of d values.
struct Nibbles {
  const uint8_t* c;
};
inline float to_float_at(Nibbles p, int64_t j) { return static_cast<float>((p.c[j / 2] >> (4 * (j & 1))) & 15); }
template <typename T>
inline float to_float_at(const T* p, int64_t j) { return to_float(p[j]); }

// kLanes values of a row from lane j (j a multiple of kLanes) as float32.
#if defined(__AVX512F__)
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vset(float x) { return _mm512_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec lanes(Nibbles p, int64_t j) {  // 16 codes from 8 bytes
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.c + j / 2)), low = _mm_set1_epi8(0x0F);
  const __m128i n = _mm_unpacklo_epi8(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(n));
}
#elif defined(__AVX2__)
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vset(float x) { return _mm256_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline float vsum(Vec v) { return lowbit::hsum(v); }
inline Vec lanes(Nibbles p, int64_t j) {  // 8 codes from 4 bytes
  int32_t four;
  std::memcpy(&four, p.c + j / 2, sizeof four);
  const __m128i b = _mm_cvtsi32_si128(four), low = _mm_set1_epi8(0x0F);
  const __m128i n = _mm_unpacklo_epi8(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(n));
}
#endif
#if defined(__AVX2__)
template <typename T>
inline Vec lanes(const T* p, int64_t j) { return load_row(p + j); }
#endif

// The R query rows q_r = q + r·d that share one cached row x of d values: each lane of x is loaded (and converted)
// once for all R rows. dot_lanes: q_r · x as the sum of the 8 lanes of part[r] (AVX2); dot_rows: out[r · stride] = q_r · x.
#if defined(__AVX2__)
inline __m256 to_eight(__m256 v) { return v; }
#if defined(__AVX512F__)
inline __m256 to_eight(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
#endif
template <int R, typename Row>
inline void dot_lanes(const float* q, Row x, int64_t d, __m256* part) {
  int64_t j = 0;
  Vec acc[R];
  for (int r = 0; r < R; ++r) acc[r] = vzero();
  for (; j + kLanes <= d; j += kLanes) {
    const Vec v = lanes(x, j);
    for (int r = 0; r < R; ++r) acc[r] = vfma(vload(q + r * d + j), v, acc[r]);
  }
  float tail[R] = {};
  for (; j < d; ++j) {
    const float v = to_float_at(x, j);
    for (int r = 0; r < R; ++r) tail[r] += q[r * d + j] * v;
  }
  for (int r = 0; r < R; ++r) part[r] = _mm256_add_ps(to_eight(acc[r]), _mm256_setr_ps(tail[r], 0, 0, 0, 0, 0, 0, 0));
}

// s[r · stride + t − t0] = Σ lanes of part_r(t) for r < R, t0 ≤ t < t1, where lanes(t, part) writes the R partial
// vectors of position t: eight positions reduced at once (hsum8).
template <int R, typename Lanes>
inline void reduce_by_eight(int64_t t0, int64_t t1, Lanes lanes_at, float* s, int64_t stride) {
  for (int64_t u = t0; u < t1; u += 8) {
    const int64_t m = std::min<int64_t>(8, t1 - u);
    __m256 byrow[R][8];
    for (int64_t i = 0; i < 8; ++i) {
      __m256 part[R];
      if (i < m) {
        lanes_at(u + i, part);
      } else {
        for (int r = 0; r < R; ++r) part[r] = _mm256_setzero_ps();
      }
      for (int r = 0; r < R; ++r) byrow[r][i] = part[r];
    }
    for (int r = 0; r < R; ++r) {
      alignas(32) float sums[8];
      _mm256_store_ps(sums, lowbit::hsum8(byrow[r]));
      std::copy(sums, sums + m, s + r * stride + u - t0);
    }
  }
}
#endif

template <int R, typename Row>
inline void dot_rows(const float* q, Row x, int64_t d, float* out, int64_t stride) {
#if defined(__AVX2__)
  __m256 part[R];
  dot_lanes<R>(q, x, d, part);
  for (int r = 0; r < R; ++r) out[r * stride] = lowbit::hsum(part[r]);
#else
  float dot[R] = {};
  for (int64_t j = 0; j < d; ++j) {
    const float v = to_float_at(x, j);
    for (int r = 0; r < R; ++r) dot[r] += q[r * d + j] * v;
  }
  for (int r = 0; r < R; ++r) out[r * stride] = dot[r];
#endif
}

// o_r += Σ_{t0 ≤ t < t1} w[r · stride + t − t0] · x(t) for the R output rows o_r = o + r·d, x(t) a cached
// row of d values (its scale already folded into w). Positions go in tiles of kTile whose rows stay in L1 while
// the tile is read once per column block; per column block the R rows' sums stay in registers over the tile's
// positions (one store per block and tile), each x(t) block loaded once for the R rows.
#if defined(__AVX512F__)
constexpr int kBlockVecs = 4;  // R ≤ 4 rows × 4 accumulators + 4 loads within 32 registers
#else
constexpr int kBlockVecs = 2;  // within 16
#endif
constexpr int64_t kTile = 32;  // 32 rows of d ≤ 256 bfloat16: 16 KB, half of L1
template <int R, typename RowAt>
inline void accumulate_rows(const float* w, int64_t stride, int64_t t0, int64_t t1, RowAt x, float* o, int64_t d) {
  int64_t j_tail = 0;
#if defined(__AVX2__)
  constexpr int64_t B = kBlockVecs * kLanes;
  j_tail = d - d % B;
  for (int64_t u0 = t0; u0 < t1; u0 += kTile) {
    const int64_t u1 = std::min(t1, u0 + kTile);
    for (int64_t j0 = 0; j0 < j_tail; j0 += B) {
      Vec acc[R][kBlockVecs];
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < kBlockVecs; ++b) acc[r][b] = vzero();
      for (int64_t t = u0; t < u1; ++t) {
        const auto row = x(t);
        Vec v[kBlockVecs];
        for (int b = 0; b < kBlockVecs; ++b) v[b] = lanes(row, j0 + b * kLanes);
        for (int r = 0; r < R; ++r) {
          const Vec wr = vset(w[r * stride + t - t0]);
          for (int b = 0; b < kBlockVecs; ++b) acc[r][b] = vfma(wr, v[b], acc[r][b]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < kBlockVecs; ++b) {
          float* out = o + r * d + j0 + b * kLanes;
          vstore(out, vadd(vload(out), acc[r][b]));
        }
    }
  }
#endif
  if (j_tail == d) return;
  for (int64_t t = t0; t < t1; ++t) {
    const auto row = x(t);
    for (int r = 0; r < R; ++r) {
      const float wa = w[r * stride + t - t0];
      for (int64_t j = j_tail; j < d; ++j) o[r * d + j] += wa * to_float_at(row, j);
    }
  }
}

// The rows r0 … rows − 1 in runs of up to four, each run one instantiation of F<R> (R = run length).
template <typename F>
inline void in_runs(int64_t rows, F f) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    switch (std::min<int64_t>(4, rows - r0)) {
      case 1: f(r0, std::integral_constant<int, 1>()); break;
      case 2: f(r0, std::integral_constant<int, 2>()); break;
      case 3: f(r0, std::integral_constant<int, 3>()); break;
      default: f(r0, std::integral_constant<int, 4>()); break;
    }
  }
}

// s[r · stride] = q_r · x for r < rows; s[r · stride + t − t0] = q_r · x(t) for t0 ≤ t < t1; o_r += Σ_t w_r(t) · x(t).
template <typename Row>
inline void dots(const float* q, int64_t rows, Row x, int64_t d, float* s, int64_t stride) {
  in_runs(rows, [&](int64_t r0, auto R) { dot_rows<decltype(R)::value>(q + r0 * d, x, d, s + r0 * stride, stride); });
}
template <typename RowAt>
inline void dots(const float* q, int64_t rows, int64_t t0, int64_t t1, RowAt x, int64_t d, float* s, int64_t stride) {
#if defined(__AVX2__)
  in_runs(rows, [&](int64_t r0, auto R) {
    constexpr int Rn = decltype(R)::value;
    reduce_by_eight<Rn>(t0, t1, [&](int64_t t, __m256* part) { dot_lanes<Rn>(q + r0 * d, x(t), d, part); },
                        s + r0 * stride, stride);
  });
#else
  for (int64_t t = t0; t < t1; ++t) dots(q, rows, x(t), d, s + t - t0, stride);
#endif
}
template <typename RowAt>
inline void accumulate(const float* w, int64_t stride, int64_t rows, int64_t t0, int64_t t1, RowAt x, float* o,
                       int64_t d) {
  in_runs(rows, [&](int64_t r0, auto R) {
    accumulate_rows<decltype(R)::value>(w + r0 * stride, stride, t0, t1, x, o + r0 * d, d);
  });
}

// int4's asymmetric range of n values x[i · stride] (bfloat16): m = fp16(min), s = fp16(clamp((max − m) / 15)),
// codes c = clamp(round((x − m) / s), 0, 15) written to codes[i] (one per byte); as quantize_asymmetric.
constexpr float kInt4Levels = 15.f;
inline void int4_codes(const at::BFloat16* x, int64_t n, int64_t stride, uint8_t* codes, at::Half* s_out,
                       at::Half* m_out) {
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t i = 0; i < n; ++i) lo = std::min(lo, to_float(x[i * stride])), hi = std::max(hi, to_float(x[i * stride]));
  const at::Half m = static_cast<at::Half>(lo);
  const at::Half s = static_cast<at::Half>(std::min(std::max((hi - static_cast<float>(m)) / kInt4Levels, kScaleFloor), 65504.f));
  const float mf = static_cast<float>(m), sf = static_cast<float>(s);
  for (int64_t i = 0; i < n; ++i)
    codes[i] = static_cast<uint8_t>(std::min(kInt4Levels, std::max(0.f, std::nearbyint((to_float(x[i * stride]) - mf) / sf))));
  *s_out = s, *m_out = m;
}

// e^x for x ≤ 0 (softmax after subtracting the max): e^x = 2^i · 2^f with x·log2(e) = i + f, f ∈ [0, 1), 2^f by
// its Taylor polynomial of degree 6 (relative error < 2e-5); 8 lanes at a time where there is AVX2, the same steps.
constexpr float kExpPoly[] = {1.5403530e-4f, 1.3333558e-3f, 9.6181291e-3f, 5.5504109e-2f, 2.4022651e-1f,
                              6.9314718e-1f, 1.f};
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.f) * 1.44269504f;
  const float i = std::floor(t), f = t - i;
  float p = kExpPoly[0];
  for (int c = 1; c < 7; ++c) p = p * f + kExpPoly[c];
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(i) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
#if defined(__AVX2__)
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(1.44269504f));
  const __m256 i = _mm256_floor_ps(t), f = _mm256_sub_ps(t, i);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int c = 1; c < 7; ++c) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpPoly[c]));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(i), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

// One query row's softmax numerators in place: s_t ← e^{scale·s_t − m} with m = max_t scale·s_t; returns (m, Σ_t).
inline std::pair<float, float> softmax_numerators(float* s, int64_t n, float scale) {
  float mx = -INFINITY, sum = 0.f;
  int64_t t = 0;
#if defined(__AVX2__)
  const __m256 k = _mm256_set1_ps(scale);
  __m256 vmx = _mm256_set1_ps(-INFINITY);
  for (; t + 8 <= n; t += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(s + t), k);
    _mm256_storeu_ps(s + t, v);
    vmx = _mm256_max_ps(vmx, v);
  }
  mx = lowbit::hmax(vmx);
#endif
  for (; t < n; ++t) s[t] *= scale, mx = std::max(mx, s[t]);
  t = 0;
#if defined(__AVX2__)
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
    _mm256_storeu_ps(s + t, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  sum = lowbit::hsum(vsum);
#endif
  for (; t < n; ++t) s[t] = exp_nonpositive(s[t] - mx), sum += s[t];
  return {mx, sum};
}

// GELU with the tanh approximation: ½x(1 + tanh(√(2/π)(x + 0.044715x³))).
inline float gelu_tanh(float x) {
  return 0.5f * x * (1.f + std::tanh(0.7978845608f * (x + 0.044715f * x * x * x)));
}

// Rotate-half RoPE: x'ᵢ = xᵢ cosᵢ − x_{i+d/2} sinᵢ,  x'_{i+d/2} = x_{i+d/2} cos_{i+d/2} + xᵢ sin_{i+d/2}.
void rope(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// Codes [n, d] in `like`'s dtype and float16 scales [n, d / block] (block 0: one per row, [n]) of float32 rows
// x [n, d] as the cache stores them (static_scale > 0: that scale, and no scales returned): what tests compare
// with quantize_tokens.
std::tuple<Tensor, Tensor> kv_store_rows(Tensor x, Tensor like, double static_scale, int64_t block) {
  Tensor xf = x.to(at::kFloat).contiguous();
  TORCH_CHECK(xf.dim() == 2, "rows: [n, d]");
  const int64_t n = xf.size(0), d = xf.size(1), B = block > 0 ? block : d, nb = d / B;
  TORCH_CHECK(d % B == 0 && (B == d || like.scalar_type() == at::kChar), "blocks: int8, dividing d");
  Tensor codes = at::empty({n, d}, like.options());
  Tensor scales = at::empty(block > 0 ? std::vector<int64_t>{n, nb} : std::vector<int64_t>{static_scale > 0 ? 0 : n},
                            at::TensorOptions().dtype(at::kHalf));
  for (int64_t i = 0; i < n; ++i) {
    at::Half* s = static_scale > 0 ? nullptr : scales.data_ptr<at::Half>() + i * nb;
    const float* row = xf.data_ptr<float>() + i * d;
    switch (like.scalar_type()) {
      case at::kChar: store_blocks(row, codes.data_ptr<int8_t>() + i * d, s, static_cast<float>(static_scale), d, nb); break;
      case at::kFloat8_e4m3fn:
        store_row(row, codes.data_ptr<at::Float8_e4m3fn>() + i * d, s, static_cast<float>(static_scale), d);
        break;
      default: TORCH_CHECK(false, "kv_store_rows: int8 or float8_e4m3fn codes");
    }
  }
  return {codes, scales};
}

// (packed codes [n, d/2], fp16 scales, fp16 minimums) of bfloat16 x [n, d] as the int4 cache stores them: keys
// (per_channel) with one scale and minimum per channel over the n rows, values with one per row.
std::tuple<Tensor, Tensor, Tensor> kv_int4_rows(Tensor x, bool per_channel) {
  Tensor xb = x.to(at::kBFloat16).contiguous();
  TORCH_CHECK(xb.dim() == 2 && xb.size(1) % 2 == 0, "rows: [n, d], d even");
  const int64_t n = xb.size(0), d = xb.size(1), count = per_channel ? d : n;
  Tensor packed = at::zeros({n, d / 2}, at::TensorOptions().dtype(at::kByte));
  Tensor scales = at::empty({count}, at::TensorOptions().dtype(at::kHalf)), mins = at::empty_like(scales);
  std::vector<uint8_t> codes(per_channel ? n : d);
  const at::BFloat16* X = xb.data_ptr<at::BFloat16>();
  uint8_t* P = packed.data_ptr<uint8_t>();
  for (int64_t i = 0; i < count; ++i) {
    int4_codes(per_channel ? X + i : X + i * d, codes.size(), per_channel ? d : 1, codes.data(),
               scales.data_ptr<at::Half>() + i, mins.data_ptr<at::Half>() + i);
    for (size_t r = 0; r < codes.size(); ++r) {
      const int64_t row = per_channel ? r : i, col = per_channel ? i : r;
      P[row * (d / 2) + col / 2] |= codes[r] << (4 * (col & 1));
    }
  }
  return {packed, scales, mins};
}

// float16 scales h[0..n) as float32 (F16C where there is one: 8 at a time, the same values).
inline void halves_to_floats(const at::Half* h, int64_t n, float* out) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
  for (; i < n; ++i) out[i] = static_cast<float>(h[i]);
}

// w[r · stride + i] *= a[i] for r < rows, i < n: folds per-position scales into the softmax weights.
inline void scale_rows(float* w, int64_t stride, int64_t rows, const float* a, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) w[r * stride + i] *= a[i];
}

// Readers of one layer's kv head for attention, over the `rows` query heads that share it, for positions
// t0 ≤ t < t1 (i = t − t0):
// scores(q, rows, t0, t1, s, stride): s[r · stride + i] = q_r · k̂_t;
// accumulate(w, stride, rows, t0, t1, o): o_r += Σ_t w[r · stride + i] · v̂_t (w is scaled in place).
// Per-position formats: x̂_t = s_t · row_t (s_t from float16 scales, or one static scale; 1 for float rows).
template <typename T>
struct CodedRows {
  const T *K, *V;
  const at::Half *KS, *VS;
  float kst, vst;
  int64_t d;
  std::vector<float> scale;
  void scores(const float* q, int64_t rows, int64_t t0, int64_t t1, float* s, int64_t stride) {
    dots(q, rows, t0, t1, [&](int64_t t) { return K + t * d; }, d, s, stride);
    per_position(KS, kst, t0, t1);
    scale_rows(s, stride, rows, scale.data(), t1 - t0);
  }
  void accumulate(float* w, int64_t stride, int64_t rows, int64_t t0, int64_t t1, float* o) {
    per_position(VS, vst, t0, t1);
    scale_rows(w, stride, rows, scale.data(), t1 - t0);
    ::accumulate(w, stride, rows, t0, t1, [&](int64_t t) { return V + t * d; }, o, d);
  }
  void per_position(const at::Half* h, float fixed, int64_t t0, int64_t t1) {
    scale.resize(t1 - t0);
    if (h)
      halves_to_floats(h + t0, t1 - t0, scale.data());
    else
      std::fill(scale.begin(), scale.end(), fixed);
  }
};

// The query as it reads int8 keys, per block of B channels (quantize_query): s_q = max(max_j |q_j| / 127, 2⁻¹²⁶),
// c_q = clamp(round(q / s_q), −127, 127).
constexpr float kQueryScaleFloor = 1.17549435e-38f;  // 2⁻¹²⁶, schemes.kv_cache.QUERY_SCALE_FLOOR
inline void quantize_query(const float* q, int64_t d, int64_t B, int8_t* c, float* s) {
  for (int64_t b = 0; b < d / B; ++b) {
    float amax = 0.f;
    for (int64_t j = b * B; j < (b + 1) * B; ++j) amax = std::max(amax, std::abs(q[j]));
    s[b] = std::max(amax / 127.f, kQueryScaleFloor);
    for (int64_t j = b * B; j < (b + 1) * B; ++j)
      c[j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(q[j] / s[b]))));
  }
}

#if defined(__AVX2__)
// The same sums as the 8 lanes of part[r], for blocks of B = d / nb channels, a multiple of 32 (|k| · sign(q, k) by
// maddubs, or VNNI's dpbusd; |products| ≤ 127², so maddubs' int16 pair sums never saturate).
template <int R>
inline void int8_dot_lanes(const int8_t* qc, const float* qs, const int8_t* k, const float* ks, int64_t d, int64_t nb,
                           int64_t B, __m256* part) {
  for (int r = 0; r < R; ++r) part[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm256_setzero_si256();
    for (int64_t j = b * B; j < (b + 1) * B; j += 32) {
      const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + j));
      const __m256i ak = _mm256_sign_epi8(kv, kv);
      for (int r = 0; r < R; ++r) {
        const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qc + r * d + j));
        sum[r] = lowbit::dot_u8s8_acc(sum[r], ak, _mm256_sign_epi8(qv, kv));
      }
    }
    for (int r = 0; r < R; ++r)
      part[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_set1_ps(qs[r * nb + b] * ks[b]), part[r]);
  }
}
#endif

// out[r · stride] = Σ_b qs_rb · ks_b · Σ_{j∈b} qc_rj · k_j for R quantized query rows (qc + r·d, scales qs + r·nb) and
// one int8 key row k of nb blocks of B channels (scales ks): each block's sum exact in int32. One position at a
// time, each row's lanes summed on their own: measured faster here than eight positions reduced at once.
template <int R>
inline void int8_dot_rows(const int8_t* qc, const float* qs, const int8_t* k, const float* ks, int64_t d, int64_t nb,
                          int64_t B, float* out, int64_t stride) {
#if defined(__AVX2__)
  if (B % 32 == 0) {
    __m256 part[R];
    int8_dot_lanes<R>(qc, qs, k, ks, d, nb, B, part);
    for (int r = 0; r < R; ++r) out[r * stride] = lowbit::hsum(part[r]);
    return;
  }
#endif
  for (int r = 0; r < R; ++r) {
    float total = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      int32_t sum = 0;
      for (int64_t j = b * B; j < (b + 1) * B; ++j) sum += static_cast<int32_t>(qc[r * d + j]) * k[j];
      total += qs[r * nb + b] * ks[b] * static_cast<float>(sum);
    }
    out[r * stride] = total;
  }
}

// int8 with dynamic scales: keys per block (nb blocks a row) read by the query quantized alike, values as
// CodedRows reads them.
struct Int8Rows {
  CodedRows<int8_t> values;  // its K, KS: the keys and their nb scales per position
  int64_t nb;
  std::vector<int8_t> qc;
  std::vector<float> qs, ks;
  void scores(const float* q, int64_t rows, int64_t t0, int64_t t1, float* s, int64_t stride) {
    const int8_t* K = values.K;
    const int64_t d = values.d;
    qc.resize(rows * d), qs.resize(rows * nb), ks.resize((t1 - t0) * nb);
    for (int64_t r = 0; r < rows; ++r) quantize_query(q + r * d, d, d / nb, qc.data() + r * d, qs.data() + r * nb);
    halves_to_floats(values.KS + t0 * nb, (t1 - t0) * nb, ks.data());
    const int64_t B = d / nb;
    in_runs(rows, [&](int64_t r0, auto R) {
      for (int64_t t = t0; t < t1; ++t)
        int8_dot_rows<decltype(R)::value>(qc.data() + r0 * d, qs.data() + r0 * nb, K + t * d, ks.data() + (t - t0) * nb,
                                          d, nb, B, s + r0 * stride + t - t0, stride);
    });
  }
  void accumulate(float* w, int64_t stride, int64_t rows, int64_t t0, int64_t t1, float* o) {
    values.accumulate(w, stride, rows, t0, t1, o);
  }
};

// int4: positions below `whole` from the codes, k̂_tc = s_gc · c_tc + m_gc (g = t / G) and v̂_t = s_t · c_t + m_t;
// the others from the bfloat16 residual (slot t mod G). q · k̂_t = (q ⊙ s_g) · c_t + q · m_g, with q ⊙ s_g and
// q · m_g kept per query row for the group last read.
struct Int4Rows {
  const uint8_t *K, *V;
  const at::Half *KS, *KM, *VS, *VM;
  const at::BFloat16 *KR, *VR;
  int64_t d, G, whole;
  std::vector<float> qs, qm;
  int64_t cached = -1;
  Int4Rows(const uint8_t* K, const uint8_t* V, const at::Half* KS, const at::Half* KM, const at::Half* VS,
           const at::Half* VM, const at::BFloat16* KR, const at::BFloat16* VR, int64_t d, int64_t G, int64_t whole,
           int64_t rows)
      : K(K), V(V), KS(KS), KM(KM), VS(VS), VM(VM), KR(KR), VR(VR), d(d), G(G), whole(whole), qs(rows * d), qm(rows) {}
  void scores(const float* q, int64_t rows, int64_t t0, int64_t t1, float* s, int64_t stride) {
    for (int64_t t = t0; t < t1; ++t) score(q, rows, t, s + t - t0, stride);
  }
  void score(const float* q, int64_t rows, int64_t t, float* s, int64_t stride) {
    if (t >= whole) return dots(q, rows, KR + (t % G) * d, d, s, stride);
    const int64_t g = t / G;
    if (cached != g) {
      for (int64_t r = 0; r < rows; ++r) {
        float b = 0.f;
        for (int64_t c = 0; c < d; ++c) {
          qs[r * d + c] = q[r * d + c] * static_cast<float>(KS[g * d + c]);
          b += q[r * d + c] * static_cast<float>(KM[g * d + c]);
        }
        qm[r] = b;
      }
      cached = g;
    }
    dots(qs.data(), rows, Nibbles{K + t * (d / 2)}, d, s, stride);
    for (int64_t r = 0; r < rows; ++r) s[r * stride] += qm[r];
  }
  void accumulate(float* w, int64_t stride, int64_t rows, int64_t t0, int64_t t1, float* o) {
    const int64_t q1 = std::min(t1, std::max(t0, whole)), n = q1 - t0;  // [t0, q1) quantized, [q1, t1) residual
    std::vector<float> s(n), m(n);
    halves_to_floats(VS + t0, n, s.data());
    halves_to_floats(VM + t0, n, m.data());
    for (int64_t r = 0; r < rows; ++r) {  // Σ_t w_t · m_t, the minimums' share, on every channel
      float b = 0.f;
      for (int64_t i = 0; i < n; ++i) b += w[r * stride + i] * m[i];
      for (int64_t j = 0; j < d; ++j) o[r * d + j] += b;
    }
    scale_rows(w, stride, rows, s.data(), n);
    ::accumulate(w, stride, rows, t0, q1, [&](int64_t t) { return Nibbles{V + t * (d / 2)}; }, o, d);
    ::accumulate(w + q1 - t0, stride, rows, q1, t1, [&](int64_t t) { return VR + (t % G) * d; }, o, d);
  }
};

}  // namespace

class DecodeStep {
 public:
  // cos, sin: [tables, max_len, head_dim]; activation: an Activation code.
  DecodeStep(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, Tensor cos, Tensor sin, Tensor k_cache,
             Tensor v_cache, Tensor final_norm, double attn_scale, double embed_scale, int64_t activation)
      : heads_(heads), kv_heads_(kv_heads), d_(head_dim), eps_(eps), attn_scale_(static_cast<float>(attn_scale)),
        embed_scale_(static_cast<float>(embed_scale)), activation_(activation), cos_(cos.to(at::kFloat).contiguous()),
        sin_(sin.to(at::kFloat).contiguous()), k_cache_(k_cache), v_cache_(v_cache), final_norm_(to_floats(final_norm)) {
    TORCH_CHECK(activation == kSilu || activation == kGeluTanh, "unknown activation code");
    const auto t = k_cache.scalar_type();
    TORCH_CHECK((t == at::kBFloat16 || t == at::kFloat || t == at::kChar || t == at::kFloat8_e4m3fn || t == at::kByte) &&
                    k_cache.is_contiguous() && v_cache.is_contiguous() && v_cache.scalar_type() == t,
                "KV cache: contiguous float32, bfloat16, int8, float8_e4m3fn or uint8 (int4 pairs)");
    TORCH_CHECK(k_cache.dim() == 5 && k_cache.size(2) == kv_heads &&
                    k_cache.size(4) == (t == at::kByte ? head_dim / 2 : head_dim), "KV cache shape");
    max_len_ = k_cache.size(3), slots_ = k_cache.size(1);
    TORCH_CHECK(cos_.dim() == 3 && cos_.size(1) >= max_len_ && cos_.size(2) == head_dim && sin_.sizes() == cos_.sizes(),
                "RoPE tables: [tables, max_len, head_dim]");
  }

  void add_block(ProjectionPtr qkv, ProjectionPtr o, ProjectionPtr gate_up, ProjectionPtr down, Tensor norm_attn,
                 Tensor norm_mlp, c10::optional<Tensor> q_norm, c10::optional<Tensor> k_norm,
                 c10::optional<Tensor> post_attn, c10::optional<Tensor> post_mlp, int64_t window, int64_t rope) {
    TORCH_CHECK(window >= 0 && rope >= 0 && rope < cos_.size(0), "window or RoPE table out of range");
    Block blk{qkv, o, gate_up, down, to_floats(norm_attn), to_floats(norm_mlp)};
    if (q_norm) blk.q_norm = to_floats(*q_norm);
    if (k_norm) blk.k_norm = to_floats(*k_norm);
    if (post_attn) blk.post_attn = to_floats(*post_attn);
    if (post_mlp) blk.post_mlp = to_floats(*post_mlp);
    blk.window = window, blk.rope = rope;
    blocks_.push_back(std::move(blk));
  }

  // The embedding: a dense table [V, D] (float32 or bfloat16), or the rows of a tied packed head.
  void set_embedding_table(Tensor table) {
    TORCH_CHECK(table.dim() == 2 && table.is_contiguous(), "embedding table: contiguous [V, D]");
    embed_ = table.scalar_type() == at::kBFloat16 ? table : table.to(at::kFloat).contiguous();
    embed_rows_ = nullptr;
  }

  void set_embedding_rows(ProjectionPtr head) {
    TORCH_CHECK(head->kind() == kPacked, "a tied embedding must be a packed head");
    embed_rows_ = head;
  }

  void set_head(ProjectionPtr head) { head_ = head; }

  // int8 / FP8 caches: float16 scales per position [L, S, kv_heads, max_len] (int8 keys: [..., max_len, d / B], a
  // scale per block of B channels), or float32 static ones [L].
  void set_cache_scales(Tensor k_scale, Tensor v_scale) {
    const int64_t layers = k_cache_.size(0), rows = layers * slots_ * kv_heads_ * max_len_;
    if (k_scale.scalar_type() == at::kHalf) {
      TORCH_CHECK(k_scale.is_contiguous() && v_scale.is_contiguous() && v_scale.scalar_type() == at::kHalf &&
                      k_scale.numel() % rows == 0 && v_scale.numel() == rows,
                  "KV cache scales: contiguous float16 [L, S, kv_heads, max_len] (int8 keys: [..., d / B])");
      k_blocks_ = k_scale.numel() / rows;
      TORCH_CHECK(d_ % k_blocks_ == 0 && (k_blocks_ == 1 || k_cache_.scalar_type() == at::kChar),
                  "key scale blocks: int8, dividing head_dim");
      k_scale_ = k_scale, v_scale_ = v_scale;
    } else {
      TORCH_CHECK(k_cache_.scalar_type() != at::kChar, "static KV cache scales: fp8 only");
      TORCH_CHECK(k_scale.numel() == layers && v_scale.numel() == layers, "static KV cache scales: one per layer");
      k_static_ = to_floats(k_scale), v_static_ = to_floats(v_scale);
    }
  }

  // int4 caches: keys' float16 scales and minimums [L, S, kv_heads, ⌈max_len / G⌉, d], values' [L, S, kv_heads,
  // max_len], and the bfloat16 residuals [L, S, kv_heads, G, d] of the incomplete group.
  void set_int4_cache(Tensor k_scale, Tensor k_min, Tensor v_scale, Tensor v_min, Tensor k_residual, Tensor v_residual) {
    const int64_t blocks = k_cache_.size(0) * slots_, G = k_residual.size(3), groups = (max_len_ + G - 1) / G;
    TORCH_CHECK(k_cache_.scalar_type() == at::kByte && d_ % 2 == 0, "an int4 cache holds uint8 code pairs");
    for (const Tensor* t : {&k_scale, &k_min, &v_scale, &v_min})
      TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous(), "int4 scales and minimums: contiguous float16");
    TORCH_CHECK(k_scale.numel() == blocks * kv_heads_ * groups * d_ && k_min.numel() == k_scale.numel() &&
                    v_scale.numel() == blocks * kv_heads_ * max_len_ && v_min.numel() == v_scale.numel(),
                "int4 scale shapes");
    TORCH_CHECK(k_residual.scalar_type() == at::kBFloat16 && v_residual.scalar_type() == at::kBFloat16 &&
                    k_residual.is_contiguous() && v_residual.is_contiguous() &&
                    k_residual.numel() == blocks * kv_heads_ * G * d_ && v_residual.numel() == k_residual.numel(),
                "int4 residuals: contiguous bfloat16 [L, S, kv_heads, G, d]");
    k_scale_ = k_scale, k_min_ = k_min, v_scale_ = v_scale, v_min_ = v_min;
    k_residual_ = k_residual, v_residual_ = v_residual, group_ = G;
  }

  // Logits [1, V] (float32) for `token` at `position` of slot 0; writes this position's keys and values.
  // `row` (float32 [D]) replaces the table lookup for embeddings this step does not hold.
  Tensor forward(int64_t token, int64_t position, c10::optional<Tensor> row) {
    const int64_t slot = 0;
    c10::optional<Tensor> rows;
    if (row) rows = row->reshape({1, -1});
    return run(&token, &position, &slot, rows, 1);
  }

  // Logits [B, V] for B sequences at once, sequence b's token tokens[b] at positions[b] of its cache slot slots[b]
  // (distinct): each projection reads its weights once for all B rows; attention reads each sequence's own cache.
  // `rows` (float32 [B, D]) replaces the table lookups.
  Tensor forward_batch(Tensor tokens, Tensor positions, Tensor slots, c10::optional<Tensor> rows) {
    Tensor t = tokens.to(at::kLong).contiguous(), p = positions.to(at::kLong).contiguous(), s = slots.to(at::kLong).contiguous();
    const int64_t B = t.numel();
    TORCH_CHECK(B >= 1 && p.numel() == B && s.numel() == B, "tokens, positions and slots: one per sequence");
    const int64_t* sp = s.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(sp[b] >= 0 && sp[b] < slots_, "cache slot out of range");
      for (int64_t c = 0; c < b; ++c) TORCH_CHECK(sp[c] != sp[b], "two sequences in one cache slot");
    }
    return run(t.data_ptr<int64_t>(), p.data_ptr<int64_t>(), sp, rows, B);
  }

  int64_t slots() const { return slots_; }

 private:
  Tensor run(const int64_t* tokens, const int64_t* positions, const int64_t* slots, const c10::optional<Tensor>& rows,
             int64_t B) {
    TORCH_CHECK(head_ && (embed_.defined() || embed_rows_ || rows), "decode step not fully built");
    const bool coded = k_cache_.scalar_type() == at::kChar || k_cache_.scalar_type() == at::kFloat8_e4m3fn;
    TORCH_CHECK(!coded || k_scale_.defined() || !k_static_.empty(), "an int8 / FP8 KV cache needs its scales");
    TORCH_CHECK(k_cache_.scalar_type() != at::kByte || group_ > 0, "an int4 KV cache needs set_int4_cache");
    for (int64_t b = 0; b < B; ++b) TORCH_CHECK(positions[b] >= 0 && positions[b] < max_len_, "position beyond the KV cache");
    const int64_t D = head_->in_features(), q_size = heads_ * d_, kv_size = kv_heads_ * d_, width = q_size + 2 * kv_size;
    std::vector<float> h(B * D), x(B * D), qkv(B * width), attn(B * q_size);
    if (rows) {
      Tensor r = rows->to(at::kFloat).contiguous();
      TORCH_CHECK(r.numel() == B * D, "embedding rows of the wrong width");
      std::copy(r.data_ptr<float>(), r.data_ptr<float>() + B * D, h.begin());
    } else {
      for (int64_t b = 0; b < B; ++b) embed(tokens[b], h.data() + b * D, D);
    }
    if (embed_scale_ != 1.f)
      for (float& v : h) v *= embed_scale_;
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const Block& blk = blocks_[i];
      for (int64_t b = 0; b < B; ++b) rms_norm(h.data() + b * D, blk.norm_attn.data(), D, eps_, x.data() + b * D);
      (*blk.qkv)(x.data(), qkv.data(), B);
      for (int64_t b = 0; b < B; ++b) {
        const float* cos = cos_.data_ptr<float>() + (blk.rope * cos_.size(1) + positions[b]) * d_;
        const float* sin = sin_.data_ptr<float>() + (blk.rope * sin_.size(1) + positions[b]) * d_;
        float *q = qkv.data() + b * width, *k = q + q_size, *v = k + kv_size;
        for (int64_t hd = 0; hd < heads_; ++hd) {
          if (!blk.q_norm.empty()) rms_norm(q + hd * d_, blk.q_norm.data(), d_, eps_, q + hd * d_);
          rope(q + hd * d_, cos, sin, d_);
        }
        for (int64_t g = 0; g < kv_heads_; ++g) {
          if (!blk.k_norm.empty()) rms_norm(k + g * d_, blk.k_norm.data(), d_, eps_, k + g * d_);
          rope(k + g * d_, cos, sin, d_);
        }
        const int64_t first = blk.window ? std::max<int64_t>(0, positions[b] - blk.window + 1) : 0;
        store_and_attend(i, slots[b], positions[b], first, q, k, v, attn.data() + b * q_size);
      }
      add_projection(*blk.o, attn.data(), blk.post_attn, h.data(), B);
      for (int64_t b = 0; b < B; ++b) rms_norm(h.data() + b * D, blk.norm_mlp.data(), D, eps_, x.data() + b * D);
      const int64_t I = blk.gate_up->out_features() / 2;
      gu_.resize(B * 2 * I);
      (*blk.gate_up)(x.data(), gu_.data(), B);
      for (int64_t b = 0; b < B; ++b) {  // act(gate) ⊙ up, written over gate: row b's first I values
        const float* g = gu_.data() + b * 2 * I;
        float* out = gu_.data() + b * I;
        if (activation_ == kSilu)
          for (int64_t j = 0; j < I; ++j) out[j] = g[j] / (1.f + std::exp(-g[j])) * g[I + j];
        else
          for (int64_t j = 0; j < I; ++j) out[j] = gelu_tanh(g[j]) * g[I + j];
      }
      add_projection(*blk.down, gu_.data(), blk.post_mlp, h.data(), B);
    }
    for (int64_t b = 0; b < B; ++b) rms_norm(h.data() + b * D, final_norm_.data(), D, eps_, x.data() + b * D);
    Tensor logits = at::empty({B, head_->out_features()}, at::TensorOptions().dtype(at::kFloat));
    (*head_)(x.data(), logits.data_ptr<float>(), B);
    return logits;
  }

  void embed(int64_t token, float* h, int64_t D) const {
    if (embed_rows_) {
      TORCH_CHECK(token >= 0 && token < embed_rows_->out_features(), "token id out of range");
      embed_rows_->row(token, h);
      return;
    }
    TORCH_CHECK(token >= 0 && token < embed_.size(0) && embed_.size(1) == D, "token id out of range");
    if (embed_.scalar_type() == at::kBFloat16) {
      const at::BFloat16* r = embed_.data_ptr<at::BFloat16>() + token * D;
      for (int64_t j = 0; j < D; ++j) h[j] = to_float(r[j]);
    } else {
      const float* r = embed_.data_ptr<float>() + token * D;
      std::copy(r, r + D, h);
    }
  }

  // h_r += y_r, or h_r += RMSNorm(y_r) · post where the family normalises the block's output; y = x Wᵀ (M rows).
  void add_projection(const Projection& p, const float* x, const std::vector<float>& post, float* h, int64_t M) {
    const int64_t N = p.out_features();
    out_.resize(M * N);
    p(x, out_.data(), M);
    for (int64_t r = 0; r < M; ++r) {
      float* y = out_.data() + r * N;
      if (!post.empty()) rms_norm(y, post.data(), N, eps_, y);
      for (int64_t j = 0; j < N; ++j) h[r * N + j] += y[j];
    }
  }

  // The cache's [kv_heads, max_len, ...] block of layer `layer` in slot `slot` (buffers [L, S, kv_heads, ...]).
  int64_t cache_index(size_t layer, int64_t slot) const { return static_cast<int64_t>(layer) * slots_ + slot; }

  // Scales of cache block `index`, `per` a position [kv_heads, max_len, per] (nullptr: none, or one static scale).
  at::Half* scales(const Tensor& t, int64_t index, int64_t per) const {
    return t.defined() ? t.data_ptr<at::Half>() + index * kv_heads_ * max_len_ * per : nullptr;
  }

  void store_and_attend(size_t layer, int64_t slot, int64_t position, int64_t first, const float* q, const float* k,
                        const float* v, float* out) {
    switch (k_cache_.scalar_type()) {
      case at::kBFloat16: return store_and_attend<at::BFloat16>(layer, slot, position, first, q, k, v, out);
      case at::kChar: return store_and_attend<int8_t>(layer, slot, position, first, q, k, v, out);
      case at::kFloat8_e4m3fn: return store_and_attend<at::Float8_e4m3fn>(layer, slot, position, first, q, k, v, out);
      case at::kByte: return store_and_attend_int4(cache_index(layer, slot), position, first, q, k, v, out);
      default: return store_and_attend<float>(layer, slot, position, first, q, k, v, out);
    }
  }

  template <typename T>
  void store_and_attend(size_t layer, int64_t slot, int64_t position, int64_t first, const float* q, const float* k,
                        const float* v, float* out) {
    const int64_t index = cache_index(layer, slot);
    T* kc = k_cache_.data_ptr<T>() + index * kv_heads_ * max_len_ * d_;
    T* vc = v_cache_.data_ptr<T>() + index * kv_heads_ * max_len_ * d_;
    const int64_t kb = k_blocks_;
    at::Half *ks = scales(k_scale_, index, kb), *vs = scales(v_scale_, index, 1);
    const float kst = k_static_.empty() ? 1.f : k_static_[layer], vst = v_static_.empty() ? 1.f : v_static_[layer];
    for (int64_t g = 0; g < kv_heads_; ++g) {
      const int64_t at_pos = g * max_len_ + position;
      store_blocks(k + g * d_, kc + at_pos * d_, ks ? ks + at_pos * kb : nullptr, kst, d_, kb);
      store_row(v + g * d_, vc + at_pos * d_, vs ? vs + at_pos : nullptr, vst, d_);
    }
    auto coded = [&](int64_t g) {
      const int64_t at_head = g * max_len_;
      return CodedRows<T>{kc + at_head * d_, vc + at_head * d_, ks ? ks + at_head * kb : nullptr,
                          vs ? vs + at_head : nullptr, kst, vst, d_};
    };
    if constexpr (std::is_same_v<T, int8_t>) {
      attend(q, first, position + 1 - first, [&](int64_t g) {
        return Int8Rows{coded(g), kb};
      }, out);
    } else {
      attend(q, first, position + 1 - first, coded, out);
    }
  }

  // int4: the position goes to the residual (bfloat16, slot position mod G); when it completes its group, the group's
  // keys are quantized per channel and its values per position from the residual, as KVCache._store_int4 does.
  // `index`: the cache block, cache_index(layer, slot).
  void store_and_attend_int4(int64_t index, int64_t position, int64_t first, const float* q, const float* k,
                             const float* v, float* out) {
    const int64_t G = group_, d = d_, groups = (max_len_ + G - 1) / G;
    uint8_t* kc = k_cache_.data_ptr<uint8_t>() + index * kv_heads_ * max_len_ * (d / 2);
    uint8_t* vc = v_cache_.data_ptr<uint8_t>() + index * kv_heads_ * max_len_ * (d / 2);
    at::Half* ks = k_scale_.data_ptr<at::Half>() + index * kv_heads_ * groups * d;
    at::Half* km = k_min_.data_ptr<at::Half>() + index * kv_heads_ * groups * d;
    at::Half* vs = v_scale_.data_ptr<at::Half>() + index * kv_heads_ * max_len_;
    at::Half* vm = v_min_.data_ptr<at::Half>() + index * kv_heads_ * max_len_;
    at::BFloat16* kr = k_residual_.data_ptr<at::BFloat16>() + index * kv_heads_ * G * d;
    at::BFloat16* vr = v_residual_.data_ptr<at::BFloat16>() + index * kv_heads_ * G * d;
    const int64_t slot = position % G, g0 = position - slot;
    std::vector<uint8_t> codes(std::max(G, d));
    for (int64_t h = 0; h < kv_heads_; ++h) {
      at::BFloat16 *khr = kr + h * G * d, *vhr = vr + h * G * d;
      for (int64_t j = 0; j < d; ++j)
        khr[slot * d + j] = static_cast<at::BFloat16>(k[h * d + j]), vhr[slot * d + j] = static_cast<at::BFloat16>(v[h * d + j]);
      if (slot != G - 1) continue;
      uint8_t *kh = kc + h * max_len_ * (d / 2), *vh = vc + h * max_len_ * (d / 2);
      std::fill(kh + g0 * (d / 2), kh + (g0 + G) * (d / 2), 0);
      for (int64_t c = 0; c < d; ++c) {  // keys: per channel over the group's G positions
        const int64_t at_g = (h * groups + g0 / G) * d + c;
        int4_codes(khr + c, G, d, codes.data(), ks + at_g, km + at_g);
        for (int64_t t = 0; t < G; ++t) kh[(g0 + t) * (d / 2) + c / 2] |= codes[t] << (4 * (c & 1));
      }
      for (int64_t t = 0; t < G; ++t) {  // values: per position over its d channels
        const int64_t at_t = h * max_len_ + g0 + t;
        int4_codes(vhr + t * d, d, 1, codes.data(), vs + at_t, vm + at_t);
        for (int64_t c = 0; c < d; c += 2) vh[(g0 + t) * (d / 2) + c / 2] = codes[c] | (codes[c + 1] << 4);
      }
    }
    const int64_t whole = G * ((position + 1) / G), rows = heads_ / kv_heads_;
    attend(q, first, position + 1 - first, [&](int64_t h) {
      return Int4Rows(kc + h * max_len_ * (d / 2), vc + h * max_len_ * (d / 2), ks + h * groups * d, km + h * groups * d,
                      vs + h * max_len_, vm + h * max_len_, kr + h * G * d, vr + h * G * d, d, G, whole, rows);
    }, out);
  }

  // a_h = softmax(scale · q_h · K̂[first..first+T_len)ᵀ) V̂[first..first+T_len) for every head, K̂ and V̂ read through
  // rows_of(g) (CodedRows, Int4Rows) for kv head g, each cached row read once for the query heads that share it.
  // Positions are split into one chunk per thread (flash-decoding): each chunk keeps its own max m, sum l and
  // unnormalised output o per head, merged as a_h = Σ_c e^{m_c − M} o_c / Σ_c e^{m_c − M} l_c with M = max_c m_c.
  template <typename RowsOf>
  void attend(const float* q, int64_t first, int64_t T_len, RowsOf rows_of, float* out) const {
    const int64_t d = d_, H = heads_, group = heads_ / kv_heads_;
    const float scale = attn_scale_;
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), T_len / 64));
    std::vector<float> m(chunks * H), l(chunks * H), o(chunks * H * d, 0.f);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t t0 = first + c * T_len / chunks, t1 = first + (c + 1) * T_len / chunks, n = t1 - t0;
        std::vector<float> s(group * n);
        for (int64_t g = 0; g < kv_heads_; ++g) {
          auto rows = rows_of(g);
          rows.scores(q + g * group * d, group, t0, t1, s.data(), n);
          for (int64_t r = 0; r < group; ++r)
            std::tie(m[c * H + g * group + r], l[c * H + g * group + r]) = softmax_numerators(s.data() + r * n, n, scale);
          rows.accumulate(s.data(), n, group, t0, t1, o.data() + (c * H + g * group) * d);
        }
      }
    });
    for (int64_t h = 0; h < H; ++h) {
      float M = -INFINITY, L = 0.f;
      for (int64_t c = 0; c < chunks; ++c) M = std::max(M, m[c * H + h]);
      float* oh = out + h * d;
      std::fill(oh, oh + d, 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        const float w = std::exp(m[c * H + h] - M);
        L += w * l[c * H + h];
        for (int64_t j = 0; j < d; ++j) oh[j] += w * o[(c * H + h) * d + j];
      }
      for (int64_t j = 0; j < d; ++j) oh[j] /= L;
    }
  }

  int64_t heads_, kv_heads_, d_, max_len_, slots_;
  double eps_;
  float attn_scale_, embed_scale_;
  int64_t activation_;
  Tensor cos_, sin_, k_cache_, v_cache_, k_scale_, v_scale_, k_min_, v_min_, k_residual_, v_residual_;
  int64_t group_ = 0;  // int4: positions per key group
  int64_t k_blocks_ = 1;  // int8: key scales per position and head
  std::vector<float> k_static_, v_static_;  // empty: no static scales
  std::vector<float> final_norm_;
  std::vector<Block> blocks_;
  Tensor embed_;
  ProjectionPtr embed_rows_, head_;
  std::vector<float> gu_, out_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("ISA") = lowbit::isa_name();
  m.attr("BLOCK") = lowbit::kBlock;
  m.attr("DECODE_ROWS") = lowbit::kMaxRows;
  m.attr("KIND_DENSE") = static_cast<int64_t>(kDense);
  m.attr("KIND_PACKED") = static_cast<int64_t>(kPacked);
  m.attr("KIND_CALLBACK") = static_cast<int64_t>(kCallback);
  m.attr("KIND_INT8") = static_cast<int64_t>(kInt8);
  m.def("gemv", &lowbit::gemv, "y [M, N] = x [M, K] Wᵀ from packed codes (float32, M ≤ DECODE_ROWS)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("dequantize", &lowbit::dequantize, "the packed weight as a dense [N, K] tensor of the given dtype",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("kv_store_rows", &kv_store_rows, "(codes, float16 scales) of rows as the int8 / FP8 KV cache stores them",
        pybind11::arg("x"), pybind11::arg("like"), pybind11::arg("static_scale") = 0.0, pybind11::arg("block") = 0);
  m.attr("QUERY_SCALE_FLOOR") = kQueryScaleFloor;
  m.def("kv_int4_rows", &kv_int4_rows, "(packed codes, float16 scales, float16 minimums) of rows as the int4 KV cache"
        " stores keys (per_channel) or values", pybind11::arg("x"), pybind11::arg("per_channel"));
  m.def("int8_pack", &lowbit::int8_pack, "int8 weights [N, K] in the panel layout of int8_gemm");
  m.def("int8_gemm", &lowbit::int8_gemm,
        "y [M, N] = x [M, K] Wᵀ with x quantized to int8 (per row, per call, or a static scale > 0) and int32 sums",
        pybind11::arg("x"), pybind11::arg("panels"), pybind11::arg("scale"), pybind11::arg("K"),
        pybind11::arg("per_tensor") = false, pybind11::arg("static_scale") = 0.0,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("int8_quantize_rows", &lowbit::int8_quantize_rows, "(q int8 [M, K], s [M, 1]) as int8_gemm quantizes x",
        pybind11::arg("x"), pybind11::arg("per_tensor") = false, pybind11::arg("static_scale") = 0.0);
  pybind11::class_<Projection, ProjectionPtr>(m, "Projection", pybind11::module_local())
      .def_static("packed", &Projection::packed)
      .def_static("int8", &Projection::int8)
      .def_static("dense", &Projection::dense)
      .def_static("callback", &Projection::callback)
      .def_property_readonly("kind", &Projection::kind)
      .def("__call__", [](const Projection& p, Tensor x) {
        TORCH_CHECK(x.numel() == p.in_features(), "input of the wrong width");
        Tensor xf = x.to(at::kFloat).contiguous();
        Tensor y = at::empty({1, p.out_features()}, xf.options());
        p(xf.data_ptr<float>(), y.data_ptr<float>(), 1);
        return y;
      });
  pybind11::class_<DecodeStep>(m, "DecodeStep", pybind11::module_local())
      .def(pybind11::init<int64_t, int64_t, int64_t, double, Tensor, Tensor, Tensor, Tensor, Tensor, double, double,
                          int64_t>())
      .def("add_block", &DecodeStep::add_block)
      .def("set_embedding_table", &DecodeStep::set_embedding_table)
      .def("set_embedding_rows", &DecodeStep::set_embedding_rows)
      .def("set_head", &DecodeStep::set_head)
      .def("set_cache_scales", &DecodeStep::set_cache_scales)
      .def("set_int4_cache", &DecodeStep::set_int4_cache)
      .def("forward", &DecodeStep::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("forward_batch", &DecodeStep::forward_batch, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_property_readonly("slots", &DecodeStep::slots);
}
