// lowbit's packed low-bit kernels (qgemv.cpp), as the decode step (decode_step.cpp) calls them.
// The constants come from Python (lowbit/runtime/layout.py) as -D flags, so both sides agree.
#pragma once
#include <torch/extension.h>

#ifndef LOWBIT_BLOCK
#error "build through lowbit.runtime.native, which defines the layout constants"
#endif

namespace lowbit {

constexpr int kBlock = LOWBIT_BLOCK;            // columns per activation-quantization block
constexpr int kMaxRows = LOWBIT_DECODE_ROWS;    // rows at most that go through the GEMV

// A packed weight [N, K] in lowbit's layout (see qgemv.cpp); pointers into tensors owned elsewhere.
struct PackedWeight {
  const uint8_t* packed;
  const uint16_t* scale;   // float16 [N, K/group]
  const uint16_t* offset;  // float16 [N, K/group], or null
  int64_t N, K, bits, group;
};

PackedWeight packed_view(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& offset,
                         int64_t bits, int64_t group, int64_t K);
// y [M, N] = x [M, K] Wᵀ for M ≥ 1, float32 in and out.
void packed_gemv(const float* x, int64_t M, int64_t K, const PackedWeight& w, float* y);
// Rows [n0, n1) of the weight as float32 into out [n1 − n0, K].
void dequantize_range(const PackedWeight& w, int64_t n0, int64_t n1, float* out);
at::Tensor gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                const c10::optional<at::Tensor>& offset, int64_t bits, int64_t group);
at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& offset,
                      int64_t bits, int64_t group, int64_t K, at::ScalarType dtype);
const char* isa_name();

}  // namespace lowbit
