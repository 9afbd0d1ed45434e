"""Linear layers that compute straight from packed low-bit weights, choosing the kernel by shape.

* :class:`Int4Linear` (default): torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) for decode-sized
  inputs (few rows), and for prefill a transient bf16 dequantization of the same packed bytes
  followed by a dense bf16 GEMM (the int4 kernel is slower than dense bf16 for many rows).
* :class:`NativeInt4Linear`: lowbit's AVX-512 VNNI kernel, for shapes torch's kernel does not take
  (or for all int4 layers with ``LOWBIT_NATIVE=1``; measured ~20% slower than torch's on SmolLM2).
* :class:`Int8Linear`: ``_weight_int8pack_mm`` (per-channel int8) for decode, dequantize for prefill.
* :class:`DequantLinear`: the portable path for every layout lowbit saves (2/3-bit, odd group sizes,
  CUDA): int8 codes, dequantized per call.

All take bf16 activations on CPU (the quantized kernels take a 10–30× slower path for fp32).
Weights are stored once, in their packed form: nothing keeps a full-precision copy.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.schemes.grid import QuantizedWeight, dequantize

DECODE_ROWS = 4
INT4_GROUP_SIZES = (32, 64, 128, 256)


INT4_BLOCK_N = 64


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def unpack_int4_cpu_layout(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Codes [N, K] from torch's CPU int4 layout.

    For N a multiple of 64 the layout is [N/64, K, 32] bytes: byte j of column k in row block b
    holds row 64b + j in its low nibble and row 64b + j + 32 in its high nibble.
    """
    p = packed.reshape(n // INT4_BLOCK_N, k, INT4_BLOCK_N // 2)
    u = torch.cat([p & 0xF, p >> 4], dim=-1)
    return u.permute(0, 2, 1).reshape(n, k)


@functools.lru_cache(maxsize=1)
def _int4_layout_is_known() -> bool:
    """Whether this torch build has the int4 CPU kernel with the layout :func:`unpack_int4_cpu_layout` reads."""
    if not _has_op("_weight_int4pack_mm_for_cpu"):
        return False
    u = torch.randint(0, 16, (2 * INT4_BLOCK_N, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    return torch.equal(unpack_int4_cpu_layout(packed, *u.shape).to(torch.int32), u)


class _FastLinear(nn.Module):
    in_features: int
    out_features: int

    def __init__(self, bias: Optional[torch.Tensor], dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias


class Int4Linear(_FastLinear):
    """4-bit weights in torch's CPU int4 layout: ``packed`` uint8 [N, K/2] and ``scale_zero`` [K/g, N, 2].

    The kernel computes w = (u − 8)·s + m for u ∈ [0, 15]; lowbit's w = (q − z)·s with q = u − 8
    maps to m = −z·s.
    """

    def __init__(self, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None, dtype=torch.bfloat16):
        super().__init__(bias, dtype)
        self.out_features, self.in_features = qw.shape
        self.group_size = qw.group_size
        u = (qw.q.to(torch.int32) + 8).contiguous()
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1))
        s = qw.scale.float()
        m = torch.zeros_like(s) if qw.zero_point is None else -qw.zero_point.float() * s
        self.register_buffer("scale_zero", torch.stack([s.t(), m.t()], dim=2).to(dtype).contiguous())

    @staticmethod
    def supports(qw: QuantizedWeight) -> bool:
        n, k = qw.shape
        return (
            qw.args.num_bits == 4
            and not qw.args.is_codebook
            and qw.group_size in INT4_GROUP_SIZES
            and n % INT4_BLOCK_N == 0
            and _int4_layout_is_known()
        )

    def unpacked_codes(self) -> torch.Tensor:
        """u ∈ [0, 15] as uint8 [N, K] (see :func:`unpack_int4_cpu_layout`)."""
        return unpack_int4_cpu_layout(self.packed, self.out_features, self.in_features)

    def dequantized(self) -> torch.Tensor:
        from lowbit.runtime.native import decode_step_module

        native = decode_step_module()
        if native is not None and self.dtype == torch.bfloat16:
            return native.int4_dequantize(self.packed, self.scale_zero, self.group_size, self.out_features, self.in_features)
        g = self.group_size
        u = self.unpacked_codes().to(self.dtype).reshape(self.out_features, -1, g)
        s = self.scale_zero[..., 0].t().unsqueeze(-1)
        m = self.scale_zero[..., 1].t().unsqueeze(-1)
        return ((u - 8) * s + m).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        if x2.shape[0] <= DECODE_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_zero)
        else:
            y = F.linear(x2, self.dequantized())
        return self._add_bias(y).reshape(*shape[:-1], self.out_features)


class NativeInt4Linear(_FastLinear):
    """4-bit weights for lowbit's own AVX-512 VNNI kernel (``csrc/q4gemv.cpp``).

    ``packed`` uint8 [N, K/2] holds, per 64-column chunk, column b in the low nibble and b + 32 in
    the high nibble of byte b; ``scale_offset`` float32 [N, K/g, 2] holds (s, o) with w = s·u + o,
    u ∈ [0, 15]. Decode-sized inputs go through the kernel (activations quantized to int8 per 32,
    as llama.cpp does); larger ones dequantize to bf16 and use a dense GEMM.
    """

    def __init__(self, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None, dtype=torch.bfloat16):
        super().__init__(bias, dtype)
        from lowbit.runtime.native import q4_kernels

        self.kernels = q4_kernels()
        self.out_features, self.in_features = n, k = qw.shape
        self.group_size = qw.group_size
        u = (qw.q.to(torch.int16) + 8).to(torch.uint8).reshape(n, k // 64, 2, 32)
        self.register_buffer("packed", (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, k // 2).contiguous())
        s = qw.scale.float()
        z = torch.zeros_like(s) if qw.zero_point is None else qw.zero_point.float()
        self.register_buffer("scale_offset", torch.stack([s, -s * (8 + z)], dim=-1).contiguous())

    @staticmethod
    def supports(qw: QuantizedWeight) -> bool:
        from lowbit.runtime.native import q4_kernels

        n, k = qw.shape
        g = qw.group_size
        return qw.args.num_bits == 4 and not qw.args.is_codebook and k % 64 == 0 and g % 32 == 0 and k % g == 0 and q4_kernels() is not None

    def dequantized(self) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        p = self.packed.reshape(n, k // 64, 1, 32)
        u = torch.cat([p & 0xF, p >> 4], dim=2).reshape(n, k // g, g).to(self.dtype)
        so = self.scale_offset.to(self.dtype)
        return (u * so[..., :1] + so[..., 1:]).reshape(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= 8:
            y = self.kernels.q4_gemv(x2.float().contiguous(), self.packed, self.scale_offset, self.group_size)
            y = y.to(self.dtype)
        else:
            y = F.linear(x2.to(self.dtype), self.dequantized())
        return self._add_bias(y).reshape(*shape[:-1], self.out_features)


class Int8Linear(_FastLinear):
    """Per-channel int8 weights [N, K] with scales [N], for ``_weight_int8pack_mm`` (symmetric only)."""

    def __init__(self, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None, dtype=torch.bfloat16):
        super().__init__(bias, dtype)
        self.out_features, self.in_features = qw.shape
        self.register_buffer("q", qw.q.contiguous())
        self.register_buffer("scale", qw.scale[:, 0].to(dtype).contiguous())

    @staticmethod
    def supports(qw: QuantizedWeight) -> bool:
        return (
            qw.args.num_bits == 8
            and not qw.args.is_codebook
            and qw.args.strategy == "channel"
            and qw.zero_point is None
            and _has_op("_weight_int8pack_mm")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        if x2.shape[0] <= DECODE_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        else:
            y = F.linear(x2, self.q.to(self.dtype) * self.scale[:, None])
        return self._add_bias(y).reshape(*shape[:-1], self.out_features)


class DequantLinear(_FastLinear):
    """Any lowbit layout: int8 codes plus scales, dequantized to the compute dtype on every call."""

    def __init__(self, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None, dtype=torch.bfloat16):
        super().__init__(bias, dtype)
        self.out_features, self.in_features = qw.shape
        self.args = qw.args
        self.register_buffer("q", qw.q)
        self.register_buffer("scale", qw.scale.to(dtype))
        self.register_buffer("zero_point", qw.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize(QuantizedWeight(self.q, self.scale, self.zero_point, self.args), self.dtype)
        return self._add_bias(F.linear(x.to(self.dtype), w))


class Fp8Linear(_FastLinear):
    """float8 e4m3 weights [N, K] with a per-channel scale [N]; upcast per call (no fp8 GEMM on CPU)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, dtype=torch.bfloat16):
        super().__init__(bias, dtype)
        self.out_features, self.in_features = weight.shape
        fp8 = torch.float8_e4m3fn
        scale = (weight.abs().amax(dim=1).float() / torch.finfo(fp8).max).clamp(min=1e-12)
        self.register_buffer("weight", (weight.float() / scale[:, None]).to(fp8))
        self.register_buffer("scale", scale.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_bias(F.linear(x.to(self.dtype), self.weight.to(self.dtype) * self.scale[:, None]))


class DenseLinear(_FastLinear):
    """A full-precision Linear held in the compute dtype."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, dtype=torch.bfloat16):
        super().__init__(bias, dtype)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(dtype).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_bias(F.linear(x.to(self.dtype), self.weight))


def fast_linear(qw: Optional[QuantizedWeight], weight=None, bias=None, device="cpu", dtype=torch.bfloat16):
    """The fastest module that computes this layer exactly as stored on this device."""
    if qw is None:
        return DenseLinear(weight, bias, dtype)
    prefer_native = os.environ.get("LOWBIT_NATIVE") == "1"
    if device == "cpu" and prefer_native and NativeInt4Linear.supports(qw):
        return NativeInt4Linear(qw, bias, dtype)
    if device == "cpu" and Int4Linear.supports(qw):
        return Int4Linear(qw, bias, dtype)
    if device == "cpu" and NativeInt4Linear.supports(qw):
        return NativeInt4Linear(qw, bias, dtype)
    if device == "cpu" and Int8Linear.supports(qw):
        return Int8Linear(qw, bias, dtype)
    return DequantLinear(qw, bias, dtype)
