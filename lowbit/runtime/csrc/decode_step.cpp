// One decode step of a Llama-style decoder in a single call (gpt-fast's lean loop, without Python).
//
// For token t at position p, with the residual stream h kept in float32:
//   h = E[t]
//   for each block:  x = RMSNorm(h) * w_attn;  [q k v] = x W_qkvᵀ (+ b);  (q, k = RMSNorm per head)
//                    q, k = RoPE_p(q, k);  K[p], V[p] = k, v
//                    a_h = softmax(q_h · K_{0..p}ᵀ / √d) V_{0..p}       (head h reads kv head h / (H / H_kv))
//                    h += a W_oᵀ;  x = RMSNorm(h) * w_mlp;  [g u] = x W_guᵀ;  h += (SiLU(g) ⊙ u) W_downᵀ
//   logits = (RMSNorm(h) * w_final) W_headᵀ
// The projections call torch's packed CPU kernels (int4, int8) or a dense bf16 GEMV on bf16 inputs;
// the small vector work (norms, RoPE, attention over the bf16 KV cache) is plain loops here.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

using at::Tensor;

enum Kind : int64_t { kDense = 0, kInt4 = 1, kInt8 = 2 };

struct Linear {
  int64_t kind;
  Tensor a, b;  // dense: (weight, -); int4: (packed, scale_zero); int8: (codes, scales)
  int64_t group;
  c10::optional<Tensor> bias;

  Tensor operator()(const Tensor& x) const {
    Tensor y;
    if (kind == kInt4)
      y = at::_weight_int4pack_mm_for_cpu(x, a, group, b);
    else if (kind == kInt8)
      y = at::_weight_int8pack_mm(x, a, b);
    else
      y = at::linear(x, a);
    if (bias) y.add_(*bias);
    return y;
  }
};

struct Block {
  Linear qkv, o, gate_up, down;
  std::vector<float> norm_attn, norm_mlp, q_norm, k_norm;
};

std::vector<float> to_floats(const Tensor& t) {
  Tensor f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

// out = x / sqrt(mean(x²) + eps) * w, written as bf16 (the projections' input dtype).
void rms_norm(const float* x, const float* w, int64_t n, double eps, at::BFloat16* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / n + static_cast<float>(eps));
  for (int64_t i = 0; i < n; ++i) out[i] = at::BFloat16(x[i] * r * w[i]);
}

void rms_norm_inplace(float* x, const float* w, int64_t n, double eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / n + static_cast<float>(eps));
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * r * w[i];
}

// bf16 → float32 is a 16-bit shift; written on the raw bits so that the loops below vectorize.
inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// e^x for x ≤ 0 (softmax after subtracting the max), vectorisable: e^x = 2^i · 2^f with x·log2(e) = i + f,
// f ∈ [0, 1), 2^f by its Taylor polynomial of degree 6 (relative error < 2e-5).
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.f) * 1.44269504f;
  const float i = std::floor(t), f = t - i;
  float p = 1.5403530e-4f;
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(i) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
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

}  // namespace

class DecodeStep {
 public:
  DecodeStep(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, Tensor cos, Tensor sin, Tensor k_cache,
             Tensor v_cache, Tensor final_norm)
      : heads_(heads), kv_heads_(kv_heads), d_(head_dim), eps_(eps), cos_(cos.to(at::kFloat).contiguous()),
        sin_(sin.to(at::kFloat).contiguous()), k_cache_(k_cache), v_cache_(v_cache), final_norm_(to_floats(final_norm)) {
    TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16 && k_cache.is_contiguous(), "KV cache: contiguous bfloat16");
    TORCH_CHECK(k_cache.dim() == 5 && k_cache.size(2) == kv_heads && k_cache.size(4) == head_dim, "KV cache shape");
    max_len_ = k_cache.size(3);
  }

  void add_block(std::vector<int64_t> kinds, std::vector<Tensor> a, std::vector<Tensor> b, std::vector<int64_t> groups,
                 std::vector<c10::optional<Tensor>> biases, Tensor norm_attn, Tensor norm_mlp,
                 c10::optional<Tensor> q_norm, c10::optional<Tensor> k_norm) {
    TORCH_CHECK(kinds.size() == 4 && a.size() == 4 && b.size() == 4 && groups.size() == 4 && biases.size() == 4,
                "a block has four projections: qkv, o, gate_up, down");
    Block blk{linear(kinds[0], a[0], b[0], groups[0], biases[0]), linear(kinds[1], a[1], b[1], groups[1], biases[1]),
              linear(kinds[2], a[2], b[2], groups[2], biases[2]), linear(kinds[3], a[3], b[3], groups[3], biases[3]),
              to_floats(norm_attn), to_floats(norm_mlp)};
    if (q_norm) blk.q_norm = to_floats(*q_norm);
    if (k_norm) blk.k_norm = to_floats(*k_norm);
    blocks_.push_back(std::move(blk));
  }

  // The embedding: a bf16 table [V, D], or int8 codes [V, D] with per-row scales (a tied int8 head).
  void set_embedding(Tensor table, c10::optional<Tensor> scale) {
    embed_ = table;
    embed_scale_ = scale ? c10::optional<Tensor>(scale->to(at::kFloat).contiguous()) : c10::nullopt;
  }

  void set_head(int64_t kind, Tensor a, Tensor b, int64_t group, c10::optional<Tensor> bias) {
    head_ = linear(kind, a, b, group, bias);
  }

  // Logits [1, V] (float32) for `token` at `position`; writes this position's keys and values.
  // `row` (float32 [D]) replaces the table lookup for embeddings this step does not hold.
  Tensor forward(int64_t token, int64_t position, c10::optional<Tensor> row) {
    TORCH_CHECK(position >= 0 && position < max_len_, "position beyond the KV cache");
    TORCH_CHECK(head_.has_value() && (embed_.defined() || row), "decode step not fully built");
    const int64_t D = row ? row->numel() : embed_.size(1), q_size = heads_ * d_, kv_size = kv_heads_ * d_;
    std::vector<float> h(D), q(q_size), k(kv_size), attn(q_size);
    if (row) {
      Tensor r = row->to(at::kFloat).contiguous();
      std::copy(r.data_ptr<float>(), r.data_ptr<float>() + D, h.begin());
    } else {
      embed(token, h.data());
    }
    Tensor x = at::empty({1, D}, at::TensorOptions().dtype(at::kBFloat16));
    Tensor a_in = at::empty({1, q_size}, x.options());
    auto* xp = x.data_ptr<at::BFloat16>();
    const float* cos = cos_.data_ptr<float>() + position * d_;
    const float* sin = sin_.data_ptr<float>() + position * d_;
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const Block& blk = blocks_[i];
      rms_norm(h.data(), blk.norm_attn.data(), D, eps_, xp);
      Tensor qkv = blk.qkv(x).to(at::kFloat).contiguous();
      const float* qkvp = qkv.data_ptr<float>();
      std::copy(qkvp, qkvp + q_size, q.begin());
      std::copy(qkvp + q_size, qkvp + q_size + kv_size, k.begin());
      const float* v = qkvp + q_size + kv_size;
      for (int64_t hd = 0; hd < heads_; ++hd) {
        if (!blk.q_norm.empty()) rms_norm_inplace(q.data() + hd * d_, blk.q_norm.data(), d_, eps_);
        rope(q.data() + hd * d_, cos, sin, d_);
      }
      at::BFloat16* kc = k_cache_.data_ptr<at::BFloat16>() + i * kv_heads_ * max_len_ * d_;
      at::BFloat16* vc = v_cache_.data_ptr<at::BFloat16>() + i * kv_heads_ * max_len_ * d_;
      for (int64_t g = 0; g < kv_heads_; ++g) {
        if (!blk.k_norm.empty()) rms_norm_inplace(k.data() + g * d_, blk.k_norm.data(), d_, eps_);
        rope(k.data() + g * d_, cos, sin, d_);
        at::BFloat16* kdst = kc + (g * max_len_ + position) * d_;
        at::BFloat16* vdst = vc + (g * max_len_ + position) * d_;
        for (int64_t j = 0; j < d_; ++j) {
          kdst[j] = at::BFloat16(k[g * d_ + j]);
          vdst[j] = at::BFloat16(v[g * d_ + j]);
        }
      }
      attend(q.data(), kc, vc, position + 1, attn.data());
      auto* ap = a_in.data_ptr<at::BFloat16>();
      for (int64_t j = 0; j < q_size; ++j) ap[j] = at::BFloat16(attn[j]);
      add_into(h.data(), blk.o(a_in));
      rms_norm(h.data(), blk.norm_mlp.data(), D, eps_, xp);
      Tensor gu = blk.gate_up(x).to(at::kFloat).contiguous();
      const int64_t I = gu.size(1) / 2;
      Tensor act = at::empty({1, I}, x.options());
      const float* g = gu.data_ptr<float>();
      auto* actp = act.data_ptr<at::BFloat16>();
      for (int64_t j = 0; j < I; ++j) actp[j] = at::BFloat16(g[j] / (1.f + std::exp(-g[j])) * g[I + j]);
      add_into(h.data(), blk.down(act));
    }
    rms_norm(h.data(), final_norm_.data(), D, eps_, xp);
    return (*head_)(x).to(at::kFloat);
  }

 private:
  static Linear linear(int64_t kind, Tensor a, Tensor b, int64_t group, c10::optional<Tensor> bias) {
    TORCH_CHECK(kind == kDense || kind == kInt4 || kind == kInt8, "unknown projection kind");
    return Linear{kind, a, b, group, bias};
  }

  void embed(int64_t token, float* h) const {
    TORCH_CHECK(token >= 0 && token < embed_.size(0), "token id out of range");
    const int64_t D = embed_.size(1);
    if (embed_scale_) {
      const int8_t* row = embed_.data_ptr<int8_t>() + token * D;
      const float s = embed_scale_->data_ptr<float>()[token];
      for (int64_t j = 0; j < D; ++j) h[j] = row[j] * s;
    } else {
      const at::BFloat16* row = embed_.data_ptr<at::BFloat16>() + token * D;
      for (int64_t j = 0; j < D; ++j) h[j] = static_cast<float>(row[j]);
    }
  }

  static void add_into(float* h, const Tensor& y) {
    Tensor f = y.to(at::kFloat).contiguous();
    const float* p = f.data_ptr<float>();
    for (int64_t j = 0; j < f.numel(); ++j) h[j] += p[j];
  }

  // a_h = softmax(q_h · K[0..T) / √d) V[0..T) for every head. Positions are split into one chunk per
  // thread (flash-decoding): each chunk keeps its own max m, sum l and unnormalised output o per head,
  // merged as a_h = Σ_c e^{m_c − M} o_c / Σ_c e^{m_c − M} l_c with M = max_c m_c. The query heads that
  // share a key/value head are served by one pass over its rows.
  void attend(const float* q, const at::BFloat16* kc, const at::BFloat16* vc, int64_t T, float* out) const {
    const int64_t d = d_, H = heads_, group = heads_ / kv_heads_, max_len = max_len_;
    const float inv_sqrt_d = 1.f / std::sqrt(static_cast<float>(d));
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), T / 64));
    std::vector<float> m(chunks * H), l(chunks * H), o(chunks * H * d, 0.f);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t t0 = c * T / chunks, t1 = (c + 1) * T / chunks, n = t1 - t0;
        std::vector<float> s(group * n), row(d);
        for (int64_t g = 0; g < kv_heads_; ++g) {
          const auto* K = reinterpret_cast<const uint16_t*>(kc + g * max_len * d);
          const auto* V = reinterpret_cast<const uint16_t*>(vc + g * max_len * d);
          for (int64_t t = t0; t < t1; ++t) {
#pragma omp simd
            for (int64_t j = 0; j < d; ++j) row[j] = bf16_to_float(K[t * d + j]);
            for (int64_t r = 0; r < group; ++r) {
              const float* qh = q + (g * group + r) * d;
              float dot = 0.f;
#pragma omp simd reduction(+ : dot)
              for (int64_t j = 0; j < d; ++j) dot += qh[j] * row[j];
              s[r * n + t - t0] = dot * inv_sqrt_d;
            }
          }
          for (int64_t r = 0; r < group; ++r) {
            float* sr = s.data() + r * n;
            float mx = -INFINITY, sum = 0.f;
            for (int64_t t = 0; t < n; ++t) mx = std::max(mx, sr[t]);
#pragma omp simd
            for (int64_t t = 0; t < n; ++t) sr[t] = exp_nonpositive(sr[t] - mx);
#pragma omp simd reduction(+ : sum)
            for (int64_t t = 0; t < n; ++t) sum += sr[t];
            m[c * H + g * group + r] = mx;
            l[c * H + g * group + r] = sum;
          }
          for (int64_t t = t0; t < t1; ++t) {
#pragma omp simd
            for (int64_t j = 0; j < d; ++j) row[j] = bf16_to_float(V[t * d + j]);
            for (int64_t r = 0; r < group; ++r) {
              float* oh = o.data() + (c * H + g * group + r) * d;
              const float w = s[r * n + t - t0];
#pragma omp simd
              for (int64_t j = 0; j < d; ++j) oh[j] += w * row[j];
            }
          }
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

  int64_t heads_, kv_heads_, d_, max_len_;
  double eps_;
  Tensor cos_, sin_, k_cache_, v_cache_;
  std::vector<float> final_norm_;
  std::vector<Block> blocks_;
  Tensor embed_;
  c10::optional<Tensor> embed_scale_;
  c10::optional<Linear> head_;
};

at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scale_zero, int64_t group, int64_t N, int64_t K);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_dequantize", &int4_dequantize, "bf16 weights [N, K] from torch's int4 CPU layout");
  pybind11::class_<DecodeStep>(m, "DecodeStep")
      .def(pybind11::init<int64_t, int64_t, int64_t, double, Tensor, Tensor, Tensor, Tensor, Tensor>())
      .def("add_block", &DecodeStep::add_block)
      .def("set_embedding", &DecodeStep::set_embedding)
      .def("set_head", &DecodeStep::set_head)
      .def("forward", &DecodeStep::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
