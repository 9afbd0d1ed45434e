// lowbit's 4-bit GEMV for x86 with AVX-512 VNNI: y[m, n] = sum_k w[n, k] x[m, k] for a few rows m.
//
// Weights: codes u in [0, 15] packed per row in chunks of 64 (byte b of a chunk holds element b in
// its low nibble and element b + 32 in its high nibble); per group j of g columns a scale s and an
// offset b so that w = s * u + b.
// Activations are quantized on the fly per block of 32 to int8 (x ~ d * xq), as llama.cpp does, so
//   y = sum_j s_j * sum_{blocks k in j} d_k * (u . xq)_k  +  sum_j b_j * X_j,   X_j = sum_{i in j} x_i
// where (u . xq)_k is one VPDPBUSD (unsigned codes times signed activations).
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <cmath>
#include <vector>

namespace {

constexpr int kMaxRows = 8;

void quantize_activations(const float* x, int64_t K, int64_t group, int8_t* xq, float* d, float* xsum) {
  for (int64_t blk = 0; blk < K / 32; ++blk) {
    const float* xb = x + blk * 32;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float scale = amax / 127.f;
    const float inv = scale > 0.f ? 1.f / scale : 0.f;
    for (int i = 0; i < 32; ++i) xq[blk * 32 + i] = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
    d[blk] = scale;
  }
  for (int64_t j = 0; j < K / group; ++j) {
    float s = 0.f;
    for (int64_t i = 0; i < group; ++i) s += x[j * group + i];
    xsum[j] = s;
  }
}

}  // namespace

torch::Tensor q4_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor scale_offset, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(), "packed: contiguous uint8 [N, K/2]");
  TORCH_CHECK(scale_offset.scalar_type() == torch::kFloat32 && scale_offset.is_contiguous(), "scale_offset: float32 [N, G, 2]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(M <= kMaxRows, "at most 8 rows");
  TORCH_CHECK(K % 64 == 0 && packed.size(1) == K / 2, "K must be a multiple of 64");
  TORCH_CHECK(group % 32 == 0 && K % group == 0, "group size must be a multiple of 32 dividing K");
  const int64_t G = K / group, chunks = K / 64;

  std::vector<int8_t> xq(M * K);
  std::vector<float> d(M * (K / 32)), xsum(M * G);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    quantize_activations(xp + m * K, K, group, xq.data() + m * K, d.data() + m * (K / 32), xsum.data() + m * G);

  // Per call and row-independent: activations reordered to match the nibble layout of a 128-column
  // pair of chunks (low nibbles: columns 0..31 of both chunks, high nibbles: columns 32..63), and the
  // per-32-block activation scales laid out lane by lane for the same two vectors.
  const int64_t pairs = chunks / 2, odd = chunks % 2;
  const int64_t P = pairs + odd;
  std::vector<int8_t> xr(M * P * 128);
  std::vector<float> dlo(M * P * 16), dhi(M * P * 16);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* src = xq.data() + m * K;
    int8_t* dst = xr.data() + m * P * 128;
    const float* dm = d.data() + m * (K / 32);
    for (int64_t p = 0; p < P; ++p) {
      const int64_t c0 = 2 * p, c1 = std::min(2 * p + 1, chunks - 1);
      for (int i = 0; i < 32; ++i) {
        dst[p * 128 + i] = src[c0 * 64 + i];
        dst[p * 128 + 32 + i] = c1 != c0 ? src[c1 * 64 + i] : 0;
        dst[p * 128 + 64 + i] = src[c0 * 64 + 32 + i];
        dst[p * 128 + 96 + i] = c1 != c0 ? src[c1 * 64 + 32 + i] : 0;
      }
      for (int i = 0; i < 8; ++i) {
        dlo[(m * P + p) * 16 + i] = dm[2 * c0];
        dlo[(m * P + p) * 16 + 8 + i] = c1 != c0 ? dm[2 * c1] : 0.f;
        dhi[(m * P + p) * 16 + i] = dm[2 * c0 + 1];
        dhi[(m * P + p) * 16 + 8 + i] = c1 != c0 ? dm[2 * c1 + 1] : 0.f;
      }
    }
  }
  // Scale offset (into a row of scale_offset) of each 32-column block.
  std::vector<int32_t> block_group(K / 32);
  for (int64_t blk = 0; blk < K / 32; ++blk) block_group[blk] = static_cast<int32_t>(2 * ((blk * 32) / group));
  const int32_t* bg = block_group.data();

  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sop = scale_offset.data_ptr<float>();
  const __m512i low = _mm512_set1_epi8(0x0F);

  // Rows in tiles of kTile: independent accumulator chains keep the FMA units busy, since a row
  // of K = 576 is only a few iterations long.
  constexpr int64_t kTile = 4;
  const int64_t tiles = (N + kTile - 1) / kTile;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n0 = t * kTile, rows = std::min(kTile, N - n0);
    __m512 acc[kTile][kMaxRows];
    for (int64_t r = 0; r < kTile; ++r)
      for (int64_t m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; ++p) {
      const int64_t c0 = 2 * p, c1 = std::min(2 * p + 1, chunks - 1);
      for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* wrow = wp + (n0 + r) * (K / 2);
        const float* so = sop + (n0 + r) * G * 2;
        const __m512i v = p < pairs ? _mm512_loadu_si512(wrow + p * 64)
                                    : _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + p * 64)));
        const __m512i lo = _mm512_and_si512(v, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        const __m512 s_lo = _mm512_insertf32x8(_mm512_set1_ps(so[bg[2 * c0]]), _mm256_set1_ps(so[bg[2 * c1]]), 1);
        const __m512 s_hi =
            _mm512_insertf32x8(_mm512_set1_ps(so[bg[2 * c0 + 1]]), _mm256_set1_ps(so[bg[2 * c1 + 1]]), 1);
        for (int64_t m = 0; m < M; ++m) {
          const int8_t* xm = xr.data() + (m * P + p) * 128;
          const __m512i zero = _mm512_setzero_si512();
          const __m512 a = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(xm)));
          const __m512 b = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, hi, _mm512_loadu_si512(xm + 64)));
          const __m512 dl = _mm512_loadu_ps(dlo.data() + (m * P + p) * 16);
          const __m512 dh = _mm512_loadu_ps(dhi.data() + (m * P + p) * 16);
          acc[r][m] = _mm512_fmadd_ps(a, _mm512_mul_ps(dl, s_lo), _mm512_fmadd_ps(b, _mm512_mul_ps(dh, s_hi), acc[r][m]));
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* so = sop + (n0 + r) * G * 2;
      for (int64_t m = 0; m < M; ++m) {
        float out = _mm512_reduce_add_ps(acc[r][m]);
        const float* xs = xsum.data() + m * G;
        for (int64_t j = 0; j < G; ++j) out += so[2 * j + 1] * xs[j];
        yp[m * N + n0 + r] = out;
      }
    }
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("q4_gemv", &q4_gemv, "4-bit GEMV with int8 activations (AVX-512 VNNI)"); }
