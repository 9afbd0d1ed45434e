// Dequantize torch's CPU int4 layout to bf16 for prefill GEMMs, in one pass over the packed bytes.
//
// packed: uint8 [N/64, K, 32] (byte j of column k in row block b holds row 64b + j in its low nibble
// and row 64b + j + 32 in its high nibble); scale_zero: bf16 [K/g, N, 2] holding (s, m) with
// w[n, k] = (u − 8) · s[k/g, n] + m[k/g, n].
#include <torch/extension.h>
#include <ATen/Parallel.h>

at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scale_zero, int64_t group, int64_t N, int64_t K) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == N * K / 2,
              "packed: contiguous uint8 in torch's int4 CPU layout");
  TORCH_CHECK(N % 64 == 0 && K % group == 0, "N must be a multiple of 64 and the group size must divide K");
  TORCH_CHECK(scale_zero.scalar_type() == at::kBFloat16 && scale_zero.is_contiguous(), "scale_zero: contiguous bf16");
  at::Tensor out = at::empty({N, K}, at::TensorOptions().dtype(at::kBFloat16));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const at::BFloat16* sz = scale_zero.data_ptr<at::BFloat16>();
  at::BFloat16* w = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, N / 64, 1, [&](int64_t begin, int64_t end) {
    float s[64], m[64];
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t k = 0; k < K; ++k) {
        if (k % group == 0)
          for (int j = 0; j < 64; ++j) {
            s[j] = static_cast<float>(sz[((k / group) * N + 64 * b + j) * 2]);
            m[j] = static_cast<float>(sz[((k / group) * N + 64 * b + j) * 2 + 1]);
          }
        const uint8_t* col = p + (b * K + k) * 32;
        for (int j = 0; j < 32; ++j) {
          w[(64 * b + j) * K + k] = at::BFloat16(static_cast<float>((col[j] & 15) - 8) * s[j] + m[j]);
          w[(64 * b + j + 32) * K + k] = at::BFloat16(static_cast<float>((col[j] >> 4) - 8) * s[j + 32] + m[j + 32]);
        }
      }
    }
  });
  return out;
}
