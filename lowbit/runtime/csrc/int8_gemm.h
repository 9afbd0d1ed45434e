// lowbit's int8 × int8 GEMM (int8_gemm.cpp), as the decode step (decode_step.cpp) calls it.
#pragma once
#include <torch/extension.h>

namespace lowbit {

// An int8 weight [N, K] with a float32 scale per output row, in the panel layout of int8_pack.
struct Int8Weight {
  const int8_t* panels;
  const float* scale;  // [N]
  int64_t N, K;
};

// How the input rows are quantized: a scale per row (dynamic), one for the call (dynamic), or a given one.
struct InputScale {
  bool per_tensor = false;
  float fixed = 0.f;  // > 0: static per-tensor scale
};

Int8Weight int8_view(const at::Tensor& panels, const at::Tensor& scale, int64_t K);
// y [M, N] = s_x s_w Σ_k q_x q_w for float32 x [M, K], x quantized to int8 on the fly as `how` says.
void int8_linear(const float* x, int64_t M, const Int8Weight& w, InputScale how, float* y);
at::Tensor int8_pack(const at::Tensor& q);
at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& scale, int64_t K,
                     bool per_tensor, double static_scale);
std::tuple<at::Tensor, at::Tensor> int8_quantize_rows(const at::Tensor& x, bool per_tensor, double static_scale);

}  // namespace lowbit
