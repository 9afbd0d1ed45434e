"""lowbit's integer grids as llama.cpp's block types, code for code.

Each type stores blocks of 32 weights of one row (``BLOCK``):

    Q4_0: float16 d, 16 bytes of codes c ∈ [0, 15]            w = d·(c − 8)      int4 symmetric, groups of 32
    Q4_1: float16 d, float16 m, 16 bytes of codes c ∈ [0, 15]   w = d·c + m        int4 asymmetric, groups of 32
    Q8_0: float16 d, 32 signed bytes q                         w = d·q            int8 symmetric, groups of 32

byte i of a 4-bit block holds c[i] in its low nibble and c[i + 16] in its high one (lowbit's own 4-bit layout).
lowbit's grids store w = (q − z)·s with q ∈ [−8, 7] for 4 bits (z = 0 when symmetric), so

    c = q + 8,   d = s,   m = −s·(8 + z),

the codes carry over unchanged and only d and m are rounded to float16 on the way (:func:`float16_change`
measures what that moves).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from lowbit.errors import LowbitError
from lowbit.schemes.args import QuantizationArgs, QuantizationScheme, make_scheme
from lowbit.schemes.grid import QuantizedWeight

BLOCK = 32


@dataclass(frozen=True)
class BlockType:
    """A GGUF block type that holds one lowbit grid exactly."""

    name: str
    bits: int
    symmetric: bool

    @property
    def qtype(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name]

    def describe(self) -> str:
        return f"int{self.bits} {'symmetric' if self.symmetric else 'asymmetric'} in groups of {BLOCK}"

    def holds(self, args: QuantizationArgs, in_features: int) -> bool:
        return (args.type == "int" and args.num_bits == self.bits and bool(args.symmetric) == self.symmetric
                and args.zp_dtype is None and args.group_size_for(in_features) == BLOCK)


TYPES = {t.name: t for t in (BlockType("Q4_0", 4, True), BlockType("Q4_1", 4, False), BlockType("Q8_0", 8, True))}


def block_type_for(args: QuantizationArgs, in_features: int) -> Optional[BlockType]:
    """The GGUF type that holds this grid code for code, or None."""
    return next((t for t in TYPES.values() if t.holds(args, in_features)), None)


def _half_bytes(x: torch.Tensor) -> np.ndarray:
    """float16 values [..., n] as their bytes [..., 2n]."""
    return x.to(torch.float16).contiguous().numpy().view(np.uint8)


def encode(qw: QuantizedWeight, kind: BlockType) -> np.ndarray:
    """The weight's blocks in ``kind``: uint8 [out, in/32 · bytes per block], rows in the weight's order."""
    N, K = qw.shape
    if not kind.holds(qw.args, K):
        raise ValueError(f"a {qw.args.describe()} grid is not {kind.name} ({kind.describe()})")
    G = K // BLOCK
    q = qw.q.to(torch.int16).reshape(N, G, BLOCK)
    s = qw.scale.float().reshape(N, G, 1)
    d = _half_bytes(s)
    if kind.bits == 8:
        return np.concatenate([d, q.to(torch.int8).numpy().view(np.uint8)], axis=-1).reshape(N, -1)
    c = (q + 8).to(torch.uint8)
    nibbles = (c[..., :16] | (c[..., 16:] << 4)).numpy()
    if kind.symmetric:
        return np.concatenate([d, nibbles], axis=-1).reshape(N, -1)
    z = qw.zero_point.float().reshape(N, G, 1)
    return np.concatenate([d, _half_bytes(-s * (8 + z)), nibbles], axis=-1).reshape(N, -1)


def decode(blocks: np.ndarray, kind: BlockType) -> torch.Tensor:
    """What llama.cpp computes from the blocks (gguf-py's reference dequantization), float32 [out, in]."""
    return torch.from_numpy(np.ascontiguousarray(quants.dequantize(blocks, kind.qtype)))


def float16_change(qw: QuantizedWeight, kind: BlockType) -> float:
    """max |w_gguf − w_lowbit| / max |w_lowbit|: what rounding d (and m) to float16 moves."""
    exact = qw.dequantize(torch.float32)
    return float((decode(encode(qw, kind), kind) - exact).abs().max() / exact.abs().max().clamp_min(1e-30))


def round_to_nearest(weight: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """A full-precision weight in one of llama.cpp's types by llama.cpp's own rounding (gguf-py's reference,
    bit-exact with ggml-quants.c for the types it can quantize), for the tensors lowbit did not quantize."""
    return quants.quantize(weight.detach().float().contiguous().numpy(), qtype)


def block_type(name: str) -> BlockType:
    """A type by its name, or a message naming those lowbit writes."""
    kind = TYPES.get(name.upper())
    if kind is None:
        raise LowbitError(f"GGUF type {name!r} is not written by lowbit yet; choose one of {', '.join(TYPES)}")
    return kind


def scheme_for(kind: BlockType, like: Optional[QuantizationScheme] = None) -> QuantizationScheme:
    """The weight-only scheme ``kind`` holds exactly, with GGUF's float16 scales (codes are rounded against the scales
    the file will store), keeping ``like``'s observer and column order; ``like`` asking for another grid is refused."""
    base = make_scheme(kind.bits, BLOCK, kind.symmetric)
    if like is None:
        weights = base.weights
    else:
        if like.input_activations is not None:
            raise LowbitError(f"GGUF {kind.name} holds weights only; drop the activation scheme")
        if not kind.holds(replace(like.weights, scale_dtype=None), BLOCK * 4):
            raise LowbitError(f"GGUF {kind.name} is {kind.describe()}; the scheme asks for {like.weights.describe()}")
        weights = like.weights
    return replace(base, weights=replace(weights, scale_dtype="float16"))
