"""lowbit's packed weight layout for its CPU kernels, and the constants Python and C++ share.

A weight [N, K] on a b-bit grid (b ∈ {2, 3, 4, 8}) is stored per row in blocks of ``BLOCK`` columns,
``BLOCK · b / 8`` bytes each, holding codes c (unsigned 0 … 2^b − 1 for b < 8, signed int8 for b = 8):

* 8 bits: byte i = c[i].
* 4 bits: byte i = c[i] | c[i + 16] << 4.
* 2 bits: byte i = c[i] | c[i + 8] << 2 | c[i + 16] << 4 | c[i + 24] << 6.
* 3 bits: the 2-bit layout of c & 3, then a little-endian 32-bit word whose bit i is c[i] >> 2.

Each group j of g columns (g a multiple of ``BLOCK``) has a float16 scale s and an optional float16
offset o: w = s·(c − c₀) + o, with the zero code c₀ = 2^(b−1) for b < 8 and 0 for 8 bits
(:func:`zero_code`). lowbit's grid is ŵ = (q − z)·s with signed q; so c = q + c₀ and o = −s·z, none
for a symmetric grid (z = 0): the kernels then subtract c₀·Σx in integers and need no offset term.

These functions are the reference the C++ kernels (``csrc/qgemv.cpp``) are tested against; the
constants reach the C++ build as ``-D`` flags (:func:`compile_definitions`), so they are defined once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Optional

import torch

from lowbit.schemes.grid import QuantizedWeight

BLOCK = 32
DECODE_ROWS = 8  # inputs of at most this many rows take the GEMV; more dequantize and run a dense GEMM
PACKED_BITS = (2, 3, 4, 8)
FP16_MAX = 65504.0


class Kind(IntEnum):
    """How the compiled decode step computes a projection."""

    DENSE = 0
    PACKED = 1
    CALLBACK = 2
    INT8 = 3


def compile_definitions() -> list[str]:
    """The shared constants as C++ ``-D`` flags."""
    kinds = [f"-DLOWBIT_KIND_{k.name}={int(k)}" for k in Kind]
    return [f"-DLOWBIT_BLOCK={BLOCK}", f"-DLOWBIT_DECODE_ROWS={DECODE_ROWS}", *kinds]


@dataclass
class PackedWeight:
    """``packed`` uint8 [N, K·bits/8], ``scale`` and ``offset`` float16 [N, K/group] (offset may be None)."""

    packed: torch.Tensor
    scale: torch.Tensor
    offset: Optional[torch.Tensor]
    bits: int
    group_size: int
    shape: tuple[int, int]


def why_not_packable(qw: QuantizedWeight) -> Optional[str]:
    """None when the kernels take this weight, else the reason in a few words."""
    n, k = qw.shape
    args = qw.args
    if args.is_codebook:
        return f"{args.type} code book (no integer kernel)"
    if args.num_bits not in PACKED_BITS:
        return f"{args.num_bits}-bit codes"
    g = qw.group_size
    if k % BLOCK or g % BLOCK:
        return f"group size {g} or width {k} not a multiple of {BLOCK}"
    s = qw.scale.float()
    offset = s * (0.0 if qw.zero_point is None else qw.zero_point.float())
    if not (torch.isfinite(offset).all() and float(s.abs().max()) <= FP16_MAX and float(offset.abs().max()) <= FP16_MAX):
        return "scales beyond float16's range"
    return None


def zero_code(bits: int) -> int:
    """c₀: the code of w = 0 on a symmetric grid (the C++ kernels use the same formula)."""
    return 0 if bits == 8 else 1 << (bits - 1)


def pack(qw: QuantizedWeight) -> PackedWeight:
    """``qw`` in the kernels' layout (see the module docstring); call :func:`why_not_packable` first."""
    bits, (n, k), g = qw.args.num_bits, qw.shape, qw.group_size
    s = qw.scale.float()
    offset = None if qw.zero_point is None else -s * qw.zero_point.float()
    q = qw.q.to(torch.int8)  # c = q + c₀ fits in int8 (at most 2^b − 1 for b < 8; q itself for b = 8)
    codes = (q if bits == 8 else q + zero_code(bits)).contiguous().view(torch.uint8)
    return PackedWeight(
        pack_codes(codes, bits), s.to(torch.float16).contiguous(),
        None if offset is None else offset.to(torch.float16).contiguous(), bits, g, (n, k),
    )


def pack_codes(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes uint8 [N, K] (K a multiple of BLOCK) → packed uint8 [N, K·bits/8]."""
    n, k = c.shape
    blocks = c.reshape(n, k // BLOCK, BLOCK)
    if bits == 8:
        out = blocks
    elif bits == 4:
        out = blocks[..., :16] | (blocks[..., 16:] << 4)
    else:
        low = blocks & 3
        out = low[..., 0:8] | (low[..., 8:16] << 2) | (low[..., 16:24] << 4) | (low[..., 24:32] << 6)
        if bits == 3:
            high = ((blocks >> 2) & 1).reshape(n, k // BLOCK, 4, 8)
            weights = (1 << torch.arange(8, dtype=torch.uint8))
            out = torch.cat([out, (high * weights).sum(-1, dtype=torch.uint8)], dim=-1)
    return out.reshape(n, -1).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: uint8 codes [N, K]."""
    n = packed.shape[0]
    blocks = packed.reshape(n, k // BLOCK, BLOCK * bits // 8)
    if bits == 8:
        return blocks.reshape(n, k)
    if bits == 4:
        return torch.cat([blocks & 15, blocks >> 4], dim=-1).reshape(n, k)
    low = blocks[..., :8]
    c = torch.cat([(low >> (2 * s)) & 3 for s in range(4)], dim=-1)
    if bits == 3:
        high = blocks[..., 8:12]
        bit = torch.cat([(high[..., t : t + 1] >> torch.arange(8, dtype=torch.uint8)) & 1 for t in range(4)], dim=-1)
        c = c | (bit << 2)
    return c.reshape(n, k)


def dequantize_packed(w: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w = s·(c − c₀) + o in float32 (then ``dtype``): the reference for the kernels' dequantization."""
    n, k = w.shape
    c = unpack_codes(w.packed, w.bits, k)
    c = (c.view(torch.int8) if w.bits == 8 else c).float() - zero_code(w.bits)
    c = c.reshape(n, k // w.group_size, w.group_size)
    out = c * w.scale.float()[..., None]
    if w.offset is not None:
        out = out + w.offset.float()[..., None]
    return out.reshape(n, k).to(dtype)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x̂ = d·xq with xq = round(x / d) ∈ [−127, 127], d = max|x| / 127 per block of ``BLOCK`` columns.

    The GEMV's activations as the kernels round them (to nearest even), so x̂ Wᵀ is its exact result up to
    float32 summation order.
    """
    m, k = x.shape
    blocks = x.float().reshape(m, k // BLOCK, BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(blocks * inv) * d).reshape(m, k)
