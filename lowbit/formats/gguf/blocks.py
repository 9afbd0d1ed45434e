"""ggml's block layouts: a :class:`~lowbit.schemes.ggml.GGMLWeight` as the bytes llama.cpp reads, and back.

The encoder is lowbit's own (gguf-py can only dequantize K-quants); :func:`decode` is gguf-py's reference
dequantizer, so ``decode(encode(w)) == w.dequantize()`` bit for bit is the test that the layout is right.

Three of lowbit's own integer grids are ggml types code for code (``EXACT``): a lowbit weight
ŵ = (q − z)·s with q ∈ [−8, 7] (4 bits) or [−128, 127] (8 bits) is

    Q4_0: c = q + 8,   d = s                   (symmetric int4, groups of 32)
    Q4_1: c = q + 8,   d = s,  m = −s·(8 + z)  (asymmetric int4, groups of 32)
    Q8_0: c = q + 128, d = s                   (symmetric int8, groups of 32)

and only d and m are rounded to float16 on the way (:func:`float16_change` measures what that moves).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from lowbit.schemes.args import QuantizationArgs, make_scheme
from lowbit.schemes.ggml import TYPES, GGMLType, GGMLWeight, quantize
from lowbit.schemes.grid import QuantizedWeight

BLOCK = 32
EXACT = {"Q4_0": (4, True), "Q4_1": (4, False), "Q8_0": (8, True)}  # type → (bits, symmetric) of the lowbit grid


def qtype(kind: GGMLType) -> GGMLQuantizationType:
    return GGMLQuantizationType[kind.name]


def exact_type(args: QuantizationArgs, in_features: int) -> Optional[GGMLType]:
    """The ggml type that holds this lowbit grid code for code, or None."""
    for name, (bits, symmetric) in EXACT.items():
        if (args.type == "int" and args.num_bits == bits and bool(args.symmetric) == symmetric
                and args.zp_dtype is None and args.group_size_for(in_features) == BLOCK):
            return TYPES[name]
    return None


def exact_args(kind: GGMLType) -> QuantizationArgs:
    """The lowbit grid an ``EXACT`` type is, with its float16 scales (the inverse of :func:`exact_type`)."""
    bits, symmetric = EXACT[kind.name]
    return replace(make_scheme(bits, BLOCK, symmetric, None, "minmax").weights, scale_dtype="float16")


def exact_types_described() -> str:
    return "; ".join(f"{name} is int{bits} {'symmetric' if sym else 'asymmetric'} in groups of {BLOCK}"
                     for name, (bits, sym) in EXACT.items())


def from_grid(qw: QuantizedWeight) -> GGMLWeight:
    """A lowbit weight on an ``EXACT`` grid as that ggml type (float16 d and m)."""
    n, k = qw.shape
    kind = exact_type(qw.args, k)
    if kind is None:
        raise ValueError(f"a {qw.args.describe()} grid is no ggml type; {exact_types_described()}")
    s = qw.scale.float()
    ones = torch.ones(n, k // BLOCK, dtype=torch.int16)
    c = (qw.q.to(torch.int16) + kind.mid).to(torch.uint8)
    if not kind.affine:
        return GGMLWeight(c, s.half(), ones, None, None, kind)
    return GGMLWeight(c, s.half(), ones, (s * (kind.mid + qw.zero_point.float())).half(), ones, kind)


def _u8(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().numpy().astype(np.uint8)


def _half(x: torch.Tensor, blocks: int) -> np.ndarray:
    """float16 values → [blocks, 2] bytes."""
    return x.to(torch.float16).contiguous().numpy().reshape(blocks, 1).view(np.uint8)


def _bits(c: np.ndarray, shift: int, width: int, groups: int) -> np.ndarray:
    """Pack ``(c >> shift)``'s low ``width`` bits, c [B, groups·n], as byte i = Σ_k part[k·n + i] << (k·width)."""
    part = (c >> shift) & ((1 << width) - 1)
    part = part.reshape(c.shape[0], groups, -1)
    return np.bitwise_or.reduce(part << (np.arange(groups, dtype=np.uint8) * width)[None, :, None], axis=1)


def _interleaved(c: np.ndarray, chunk: int, shift: int, width: int) -> np.ndarray:
    """Each ``chunk`` of c [B, super] packed by :func:`_bits` (8 / width groups per byte), chunks concatenated."""
    B = c.shape[0]
    parts = c.reshape(B, -1, chunk)
    packed = [_bits(parts[:, j], shift, width, 8 // width) for j in range(parts.shape[1])]
    return np.concatenate(packed, axis=-1)


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes holding eight 6-bit scales and eight 6-bit mins."""
    lo_s, hi_s, lo_m, hi_m = sc[:, :4], sc[:, 4:], m[:, :4], m[:, 4:]
    return np.concatenate([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 0xF) | ((hi_m & 0xF) << 4)],
                          axis=-1).astype(np.uint8)


def _q3_scales(s: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes holding sixteen 6-bit scales (stored + 32)."""
    low = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
    return np.concatenate([low, _bits(s, 4, 2, 4)], axis=-1).astype(np.uint8)


def encode(w: GGMLWeight) -> np.ndarray:
    """The weight's blocks: uint8 [out, in / super · bytes per super-block], rows in the weight's order."""
    kind = w.kind
    N, K = w.shape
    B = N * K // kind.super
    c = _u8(w.c).reshape(B, kind.super)
    d = _half(w.d, B)
    per = kind.super // kind.block
    if kind.name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        qs = (c[:, :16] & 0xF) | ((c[:, 16:] & 0xF) << 4)
        qh = [] if kind.bits == 4 else [np.packbits(c >> 4, axis=-1, bitorder="little")]
        m = [] if not kind.affine else [_half(-w.dmin.float(), B)]
        return np.concatenate([d, *m, *qh, qs], axis=-1).reshape(N, -1)
    if kind.name == "Q8_0":
        return np.concatenate([d, (c.astype(np.int16) - 128).astype(np.int8).view(np.uint8)], axis=-1).reshape(N, -1)
    sc = w.sc.numpy().reshape(B, per)
    if kind.name == "Q6_K":
        ql = _interleaved(c & 0xF, 128, 0, 4)
        qh = _interleaved(c, 128, 4, 2)
        return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d], axis=-1).reshape(N, -1)
    if kind.name == "Q3_K":
        hmask = _bits(c, 2, 1, 8)
        qs = _interleaved(c, 128, 0, 2)
        return np.concatenate([hmask, qs, _q3_scales((sc + 32).astype(np.uint8)), d], axis=-1).reshape(N, -1)
    dmin = _half(w.dmin, B)
    m = w.m.numpy().reshape(B, per).astype(np.uint8)
    if kind.name == "Q2_K":
        scales = (sc.astype(np.uint8) & 0xF) | (m << 4)
        return np.concatenate([scales, _interleaved(c, 128, 0, 2), d, dmin], axis=-1).reshape(N, -1)
    scales = _k_scales(sc.astype(np.uint8), m)
    qs = _interleaved(c & 0xF, 64, 0, 4)
    if kind.name == "Q4_K":
        return np.concatenate([d, dmin, scales, qs], axis=-1).reshape(N, -1)
    return np.concatenate([d, dmin, scales, _bits(c, 4, 1, 8), qs], axis=-1).reshape(N, -1)  # Q5_K


def unpack_symmetric(blocks: np.ndarray, kind: GGMLType) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q8_0 blocks uint8 [rows, bytes] → (signed codes q = c − mid, int8 [rows, in]; d, float16 [rows, in/32]),
    so that the weight is d · q."""
    if kind.name not in ("Q4_0", "Q8_0"):
        raise ValueError(f"{kind.name} is not a symmetric block-32 type")
    rows = blocks.shape[0]
    b = np.ascontiguousarray(blocks).reshape(rows, -1, 2 + BLOCK * kind.bits // 8)
    d = torch.from_numpy(b[..., :2].copy().view(np.float16)[..., 0])
    body = b[..., 2:]
    if kind.bits == 8:
        q = torch.from_numpy(body.copy().view(np.int8))
    else:
        c = np.concatenate([body & 0xF, body >> 4], axis=-1).astype(np.int16) - kind.mid
        q = torch.from_numpy(c.astype(np.int8))
    return q.reshape(rows, -1), d


def decode(blocks: np.ndarray, kind: GGMLType) -> torch.Tensor:
    """What llama.cpp computes from the blocks (gguf-py's reference dequantization), float32 [out, in]."""
    return torch.from_numpy(np.ascontiguousarray(quants.dequantize(blocks, qtype(kind))))


def float16_change(qw: QuantizedWeight) -> float:
    """max |w_gguf − w_lowbit| / max |w_lowbit| of a lowbit weight on an ``EXACT`` grid: what rounding d (and m)
    to float16 moves."""
    exact = qw.dequantize(torch.float32)
    return float((from_grid(qw).dequantize() - exact).abs().max() / exact.abs().max().clamp_min(1e-30))


def round_to_nearest(weight: torch.Tensor, kind: GGMLType) -> np.ndarray:
    """A full-precision weight in ``kind``, for the tensors no method rounded: llama.cpp's own rounding
    (gguf-py's bit-exact port of ggml-quants.c) where gguf-py has it, else lowbit's fitted grid."""
    w = weight.detach().float().contiguous()
    try:
        return quants.quantize(w.numpy(), qtype(kind))
    except NotImplementedError:
        return encode(quantize(w, kind))
