"""Dense bit packing of signed b-bit integers into int32 words (compressed-tensors' ``pack_to_int32``).

Values are offset to unsigned (u = q + 2^(b-1)); element i of each row occupies bits
[i·b, (i+1)·b) of a little-endian bit stream cut into 32-bit words, so a row of n values takes
⌈n·b / 32⌉ words and 3-bit values may straddle words.
"""

from __future__ import annotations

import math

import torch

_ROWS_PER_CHUNK = 4096
_UNPACK_ROWS = 512  # rows per step of unpacking: its int64 temporaries stay a few MB


def _pack_rows(u: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = u.shape
    padded = math.ceil(cols / 32) * 32
    u = torch.nn.functional.pad(u, (0, padded - cols))
    stream = ((u[..., None] >> torch.arange(bits)) & 1).reshape(rows, -1, 32)
    words = (stream << torch.arange(32, dtype=torch.int64)).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words[:, : math.ceil(cols * bits / 32)]


def _unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Value j of each row is bits [j·b, (j+1)·b) of the stream: the low part from word ⌊j·b/32⌋ and,
    when it straddles, the high part from the next word (one [rows, cols] int64 per step, not one per bit)."""
    words = torch.nn.functional.pad(packed.to(torch.int64) & 0xFFFFFFFF, (0, 1))
    start = torch.arange(cols, dtype=torch.int64) * bits
    word, shift = start // 32, start % 32
    low = words[:, word] >> shift
    high = words[:, word + 1] << (32 - shift)
    return (low | high) & ((1 << bits) - 1)


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack int8 values in [-2^(b-1), 2^(b-1)) of a 2-D tensor along ``dim`` into int32 words."""
    u = q.to(torch.int64) + (1 << (bits - 1))
    if dim == 0:
        u = u.t()
    out = torch.cat([_pack_rows(c, bits) for c in u.split(_ROWS_PER_CHUNK)]) if u.shape[0] else u.to(torch.int32)
    return (out.t() if dim == 0 else out).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int8 values of the original 2-D ``shape``."""
    rows, cols = shape if dim == 1 else (shape[1], shape[0])
    p = packed.t() if dim == 0 else packed
    offset = 1 << (bits - 1)
    q = torch.cat([(_unpack_rows(c, bits, cols) - offset).to(torch.int8) for c in p.split(_UNPACK_ROWS)])
    return (q.t() if dim == 0 else q).contiguous()
