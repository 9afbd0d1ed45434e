"""KV cache formats: how each cached position's keys and values are stored, as the pure functions that the
runtime's prompt path, its compiled decode step (``csrc/decode_step.cpp``, tested against these) and
evaluation share. x is one head's key or value vector [d] at one position; shapes below are [..., T, d].

    bf16   x̂ = bf16(x)
    int8   values per position and head, keys per position, head and block of 32 channels (llama.cpp's q8_0:
           a key's few outlier channels then cost only their own block's precision; one scale per head cost Gemma
           3's perplexity 0.5%): s = fp16(max_j |x_j| / 127) over the row (block),  c = clamp(round(x / s), −127,
           127),  x̂ = s·c. The query that reads int8 keys is quantized the same way per block with a float32
           scale, q̂ = s_q·c_q (as llama.cpp converts Q to q8_0 to dot it with q8_0 keys), so that a score is
           Σ_b s_qb·s_kb·Σ_{j∈b} c_qj·c_kj, an exact integer dot product per block (:func:`quantize_query`).
    fp8    E4M3 per position and head, s = fp16(max_j |x_j| / 448); or one static s per layer for all keys
           (values), compressed-tensors' calibrated ``k_scale`` / ``v_scale``;  c = e4m3(clamp(x / s, ±448)),
           x̂ = s·c
    int4   KIVI: keys per channel over a group of G consecutive positions, values per position and head,
           both asymmetric: s = fp16((max − min) / 15), m = fp16(min), c = clamp(round((x − m) / s), 0, 15),
           x̂ = s·c + m. A group is quantized when its last position is stored; until then its positions stay
           bf16 (KIVI's full-precision residual), so a query at position t reads position j quantized
           exactly when j < G·⌊(t + 1) / G⌋ (:func:`quantized_end`).

A calibrated fp8 cache is compressed-tensors' ``kv_cache_scheme`` (:data:`FP8_STATIC`: float, 8 bits,
per-tensor, static), with each attention module's ``k_scale`` and ``v_scale`` = max |K| / 448 and max |V| / 448
over the calibration text: the tensors vLLM reads for ``kv_cache_dtype="fp8"``.

Scales are float16, floored at fp16's smallest normal (2⁻¹⁴) so that they never underflow; the codes are
computed from the rounded scale, so x̂ is exactly what a reader reconstructs. int4 codes are packed two
per byte along d: byte i = c[2i] | c[2i + 1] << 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lowbit.errors import LowbitError
from lowbit.schemes.activations import FP8_MAX, INT8_MAX
from lowbit.schemes.args import QuantizationArgs

SCALE_FLOOR = 2.0**-14  # fp16's smallest normal
INT4_LEVELS = 15


@dataclass(frozen=True)
class KVCacheFormat:
    """One way of storing keys and values; ``group``: int4's positions per key group (G); ``key_block``: channels
    per key scale (int8), where it divides the head dimension (else one scale per row)."""

    name: str
    bits: int
    group: int = 0
    key_block: int = 0

    def key_block_of(self, head_dim: int) -> Optional[int]:
        """Channels per key scale for heads of ``head_dim`` (None: one scale per position and head)."""
        b = self.key_block
        return b if b and b < head_dim and head_dim % b == 0 else None

    @property
    def per_token(self) -> bool:
        """int8 and fp8: a scale per position and head (fp8 may instead take one static scale per layer)."""
        return self.name in ("int8", "fp8")

    def bytes_per_token(self, layers: int, kv_heads: int, head_dim: int, static: bool = False) -> float:
        """Cache bytes one more position costs over every layer's keys and values (int4: at a depth that
        fills whole groups; its bf16 residual of under G positions is a constant, not per token)."""
        d = head_dim
        if self.name == "bf16":
            per_head = 2 * 2 * d
        elif self.per_token:
            b = self.key_block_of(d)
            per_head = 2 * d + (0 if static else 2 * (d // b if b else 1) + 2)
        else:  # keys: d/2 code bytes + a scale and a minimum per channel per G positions; values: per position
            per_head = (d / 2 + 4 * d / self.group) + (d / 2 + 4)
        return layers * kv_heads * per_head


FORMATS = {
    "bf16": KVCacheFormat("bf16", 16),
    "int8": KVCacheFormat("int8", 8, key_block=32),
    "fp8": KVCacheFormat("fp8", 8),
    "int4": KVCacheFormat("int4", 4, group=64),
}


def kv_format(name: str) -> KVCacheFormat:
    """The format named ``name``, or a one-line :class:`LowbitError` listing the names."""
    if name not in FORMATS:
        raise LowbitError(f"unknown KV cache format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


# compressed-tensors' kv_cache_scheme of a calibrated FP8 cache, and the per-attention tensor names it comes with
FP8_STATIC = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", group_size=None,
                              dynamic=False, observer="minmax")
SCALE_NAMES = ("k_scale", "v_scale")


def calibrated_scheme(name: str) -> QuantizationArgs:
    """The ``kv_cache_scheme`` that ``lowbit quantize --kv-cache name`` calibrates and saves: fp8 only (int8 and
    int4 scales are set per position as the cache is written; there is nothing to calibrate)."""
    kv_format(name)
    if name != "fp8":
        raise LowbitError(f"quantize calibrates the fp8 KV cache's static scales only; the {name} cache's scales are"
                          f" set as it is written: pass --kv-cache {name} to chat, serve, bench or eval instead")
    return FP8_STATIC


def format_of_scheme(args: QuantizationArgs) -> str:
    """The runtime cache format a checkpoint's ``kv_cache_scheme`` describes, or a one-line :class:`LowbitError`."""
    if args.is_fp8 and args.strategy == "tensor" and not args.dynamic:
        return "fp8"
    raise LowbitError(f"kv_cache_scheme {args.describe()} is not one lowbit runs; it runs fp8 per-tensor static"
                      " (or pass --kv-cache to choose a cache format at load time)")


def calibrated_scale(amax: torch.Tensor) -> torch.Tensor:
    """A static fp8 cache scale [1] float32: max |x| / 448 (floored, so an all-zero calibration stays finite)."""
    return (amax.float().reshape(1) / FP8_MAX).clamp_min(SCALE_FLOOR)


def _fp16_scale(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(SCALE_FLOOR, 65504.0).to(torch.float16)


def _blocks(x: torch.Tensor, block: Optional[int]) -> torch.Tensor:
    """x [..., d] as [..., d / block, block] (block None: [..., 1, d])."""
    return x.unflatten(-1, (-1, block or x.shape[-1]))


def quantize_tokens(x: torch.Tensor, fmt: KVCacheFormat, static_scale: Optional[float] = None,
                    block: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """int8 / fp8 codes of x [..., d] (int8 or float8_e4m3fn, same shape) and the fp16 scale per position [...],
    or per position and block of ``block`` channels [..., d / block] (None with a static fp8 scale)."""
    q_max = FP8_MAX if fmt.name == "fp8" else float(INT8_MAX)
    x = _blocks(x.float(), block)
    if static_scale is not None:
        s, s_out = torch.tensor(static_scale, dtype=torch.float32), None
    else:
        s_out = _fp16_scale(x.abs().amax(-1) / q_max)
        s = s_out.float()[..., None]
        s_out = s_out if block else s_out[..., 0]
    y = (x / s).flatten(-2)
    if fmt.name == "fp8":
        return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s_out
    return y.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), s_out


def dequantize_tokens(c: torch.Tensor, s: Optional[torch.Tensor], static_scale: Optional[float] = None,
                      block: Optional[int] = None) -> torch.Tensor:
    """x̂ = s·c, float32 [..., d] (s per position [...], or per position and block [..., d / block])."""
    if s is None:
        return c.float() * torch.tensor(static_scale, dtype=torch.float32)
    return (_blocks(c.float(), block) * (s.float()[..., None] if block else s.float()[..., None, None])).flatten(-2)


QUERY_SCALE_FLOOR = 2.0**-126  # float32's smallest normal: an all-zero query block stays zero, not NaN


def quantize_query(q: torch.Tensor, fmt: KVCacheFormat) -> torch.Tensor:
    """The query [..., d] as it reads ``fmt``'s keys: for int8, q̂ = s_q·c_q per block of the keys' channels
    (s_q = max |q_b| / 127 in float32, c_q = clamp(round(q / s_q), −127, 127)); other formats read q as it is."""
    if fmt.name != "int8":
        return q
    x = _blocks(q.float(), fmt.key_block_of(q.shape[-1]))
    s = (x.abs().amax(-1, keepdim=True) / INT8_MAX).clamp_min(QUERY_SCALE_FLOOR)
    return ((x / s).round().clamp(-INT8_MAX, INT8_MAX) * s).flatten(-2).to(q.dtype)


def asymmetric_params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4's fp16 scale s = (max − min) / 15 and minimum m of a range [lo, hi]."""
    m = lo.to(torch.float16)
    return _fp16_scale((hi.float() - m.float()) / INT4_LEVELS), m


def asymmetric_codes(x: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """c = clamp(round((x − m) / s), 0, 15) as uint8."""
    return ((x.float() - m.float()) / s.float()).round().clamp(0, INT4_LEVELS).to(torch.uint8)


def quantize_asymmetric(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit codes (uint8, x's shape) with the fp16 scale s and minimum m over ``dim`` (kept as size 1):
    dim −1 for values (per position), −2 for a group of keys (per channel)."""
    x = x.float()
    s, m = asymmetric_params(x.amin(dim, keepdim=True), x.amax(dim, keepdim=True))
    return asymmetric_codes(x, s, m), s, m


def dequantize_asymmetric(c: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x̂ = s·c + m, float32 (s and m broadcast over the dimension they were taken over)."""
    return c.float() * s.float() + m.float()


def pack_nibbles(c: torch.Tensor) -> torch.Tensor:
    """Codes [..., d] (0 … 15, d even) two per byte: byte i = c[2i] | c[2i + 1] << 4."""
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_nibbles`."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def quantized_end(t: int, group: int) -> int:
    """int4: how many leading positions a query at position t reads quantized (whole groups stored by then)."""
    return group * ((t + 1) // group)
