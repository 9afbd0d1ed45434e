"""The runtime's KV cache: every layer's keys and values of S sequences (slots), stored in one
:mod:`lowbit.schemes.kv_cache` format, preallocated to the context length.

Buffers (L layers, S slots, H key/value heads, N positions, d = head_dim):

    bf16         k, v                       [L, S, H, N, d] bfloat16
    int8 / fp8   k, v codes                 [L, S, H, N, d] int8 / float8_e4m3fn
                 k_scale, v_scale           [L, S, H, N] float16, or [L] float32 when static (fp8);
                                            int8's k_scale [L, S, H, N, d/32] (a scale per block of 32 channels)
    int4         k, v codes, two per byte   [L, S, H, N, d/2] uint8
                 k_scale, k_min             [L, S, H, N/G, d] float16 (per channel, per group of G positions)
                 v_scale, v_min             [L, S, H, N] float16 (per position)
                 k_residual, v_residual     [L, S, H, G, d] bfloat16: the incomplete group, position p at p mod G

Each slot is one sequence's cache (batched decoding gives each running request its own); slot 0 is the one
a single sequence uses.

:meth:`update` writes positions as the decode step does and returns what those positions' queries may attend
to: no dequantized copy of the cache is kept, only the transient one a prompt's attention uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from lowbit.models.architectures import ARCHITECTURES
from lowbit.schemes.kv_cache import (
    SCALE_NAMES,
    KVCacheFormat,
    dequantize_asymmetric,
    dequantize_tokens,
    pack_nibbles,
    quantize_asymmetric,
    quantize_tokens,
    unpack_nibbles,
)


def calibrated_scales(hf_model: nn.Module) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """A checkpoint's static fp8 cache scales (k_scale [L], v_scale [L]) from each block's attention module (where
    ``lowbit quantize --kv-cache fp8`` and compressed-tensors put them), or None when it has none."""
    arch = ARCHITECTURES.get(getattr(hf_model.config, "model_type", None))
    if arch is None or arch.lean is None:
        return None
    attentions = [layer.get_submodule(arch.lean.attention) for layer in hf_model.get_submodule(arch.blocks)]
    if getattr(attentions[0], SCALE_NAMES[0], None) is None:
        return None
    k, v = (torch.cat([getattr(a, name).detach().float().reshape(1) for a in attentions]) for name in SCALE_NAMES)
    return k, v


@dataclass
class Entries:
    """Keys and values [H, n, d] (float32) a run of queries may read, with each entry's position [n] and whether
    it is the full-precision copy (int4's residual) rather than the quantized one."""

    k: torch.Tensor
    v: torch.Tensor
    position: torch.Tensor
    full_precision: torch.Tensor

    def visible(self, t: torch.Tensor, group: int, window: int) -> torch.Tensor:
        """[rows, n]: which entries the queries at positions t [rows] read. A quantized entry at position j is read
        when j < G·⌊(t + 1)/G⌋ (G = 1 for per-position formats: j ≤ t), the full-precision one when that bound ≤
        j ≤ t; under a sliding window, only j > t − window."""
        j, t = self.position[None], t[:, None]
        whole = group * torch.div(t + 1, group, rounding_mode="floor")
        seen = torch.where(self.full_precision[None], (j >= whole) & (j <= t), j < whole)
        return seen & (j > t - window) if window else seen


class KVCache(nn.Module):
    """Keys and values of every layer in ``fmt`` for ``slots`` sequences; ``static_scales``: fp8's per-layer
    (k_scale, v_scale) [L] each."""

    def __init__(self, fmt: KVCacheFormat, layers: int, kv_heads: int, max_len: int, head_dim: int,
                 static_scales: Optional[tuple[torch.Tensor, torch.Tensor]] = None, dense_dtype=torch.bfloat16,
                 slots: int = 1):
        """``dense_dtype``: the bf16 format's storage (float32 where a test compares against float32 exactly)."""
        super().__init__()
        self.fmt, self.max_len, self.head_dim, self.slots = fmt, max_len, head_dim, slots
        self.key_block = fmt.key_block_of(head_dim)
        self.static = static_scales is not None
        shape = (layers, slots, kv_heads, max_len, head_dim)
        if fmt.name == "bf16":
            codes = dense_dtype
        elif fmt.name == "int4":
            codes, shape = torch.uint8, (*shape[:-1], head_dim // 2)
        else:
            codes = torch.float8_e4m3fn if fmt.name == "fp8" else torch.int8
        for name in ("k", "v"):
            self.register_buffer(name, torch.zeros(shape, dtype=codes))
        per_position = torch.ones(shape[:-1], dtype=torch.float16)
        if fmt.per_token and self.static:
            self.register_buffer("k_scale", static_scales[0].float().reshape(layers).clone())
            self.register_buffer("v_scale", static_scales[1].float().reshape(layers).clone())
        elif fmt.per_token:
            blocks = (head_dim // self.key_block,) if self.key_block else ()
            self.register_buffer("k_scale", torch.ones(*per_position.shape, *blocks, dtype=torch.float16))
            self.register_buffer("v_scale", per_position)
        elif fmt.name == "int4":
            G = fmt.group
            groups = (layers, slots, kv_heads, -(-max_len // G), head_dim)
            self.register_buffer("k_scale", torch.ones(groups, dtype=torch.float16))
            self.register_buffer("k_min", torch.zeros(groups, dtype=torch.float16))
            self.register_buffer("v_scale", per_position.clone())
            self.register_buffer("v_min", torch.zeros_like(per_position))
            self.register_buffer("k_residual", torch.zeros(layers, slots, kv_heads, G, head_dim, dtype=torch.bfloat16))
            self.register_buffer("v_residual", torch.zeros_like(self.k_residual))

    @property
    def group(self) -> int:
        """Positions a quantized read waits for (int4: G; per-position formats: 1)."""
        return self.fmt.group or 1

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def store(self, i: int, start: int, k: torch.Tensor, v: torch.Tensor, slot: int = 0) -> None:
        """Write layer i's k, v [H, T, d] at positions start … start + T − 1 of ``slot``."""
        end = start + k.shape[1]
        if self.fmt.name == "bf16":
            self.k[i, slot, :, start:end], self.v[i, slot, :, start:end] = k, v
        elif self.fmt.per_token:
            for x, codes, scale, block in ((k, self.k, self.k_scale, self.key_block), (v, self.v, self.v_scale, None)):
                c, s = quantize_tokens(x, self.fmt, float(scale[i]) if self.static else None, block)
                codes[i, slot, :, start:end] = c
                if s is not None:
                    scale[i, slot, :, start:end] = s
        else:
            self._store_int4(i, start, end, k, v, slot)

    def _store_int4(self, i: int, start: int, end: int, k: torch.Tensor, v: torch.Tensor, slot: int) -> None:
        """Positions go to the bf16 residual; each group whose last position arrives is quantized from it."""
        G = self.fmt.group
        for g0 in range(start - start % G, end, G):
            lo, hi = max(start, g0), min(end, g0 + G)
            self.k_residual[i, slot, :, lo - g0 : hi - g0] = k[:, lo - start : hi - start]
            self.v_residual[i, slot, :, lo - g0 : hi - g0] = v[:, lo - start : hi - start]
            if hi == g0 + G:
                ck, sk, mk = quantize_asymmetric(self.k_residual[i, slot], dim=-2)
                self.k[i, slot, :, g0:hi], self.k_scale[i, slot, :, g0 // G], self.k_min[i, slot, :, g0 // G] = (
                    pack_nibbles(ck), sk[:, 0], mk[:, 0])
                cv, sv, mv = quantize_asymmetric(self.v_residual[i, slot], dim=-1)
                self.v[i, slot, :, g0:hi], self.v_scale[i, slot, :, g0:hi], self.v_min[i, slot, :, g0:hi] = (
                    pack_nibbles(cv), sv[..., 0], mv[..., 0])

    def update(self, i: int, start: int, k: torch.Tensor, v: torch.Tensor, slot: int = 0) -> Entries:
        """Store layer i's k, v [H, T, d] at positions start … start + T − 1 of ``slot`` and return what the queries
        at those positions read (as HF's ``Cache.update`` does)."""
        end = start + k.shape[1]
        if self.fmt.name == "int4":
            f0 = self.fmt.group * (start // self.fmt.group)  # the residual's positions f0 … start − 1, before overwritten
            earlier = (self.k_residual[i, slot, :, : start - f0].clone(), self.v_residual[i, slot, :, : start - f0].clone())
        self.store(i, start, k, v, slot)
        if self.fmt.name == "int4":
            return self._entries_int4(i, start, end, earlier, k, v, slot)
        if self.fmt.name == "bf16":
            k, v = self.k[i, slot, :, :end].float(), self.v[i, slot, :, :end].float()
        elif self.static:
            k = dequantize_tokens(self.k[i, slot, :, :end], None, float(self.k_scale[i]))
            v = dequantize_tokens(self.v[i, slot, :, :end], None, float(self.v_scale[i]))
        else:
            k = dequantize_tokens(self.k[i, slot, :, :end], self.k_scale[i, slot, :, :end], block=self.key_block)
            v = dequantize_tokens(self.v[i, slot, :, :end], self.v_scale[i, slot, :, :end])
        return Entries(k, v, torch.arange(end), torch.zeros(end, dtype=torch.bool))

    def _entries_int4(self, i: int, start: int, end: int, earlier: tuple, k_new: torch.Tensor,
                      v_new: torch.Tensor, slot: int) -> Entries:
        """The whole groups stored by position end − 1, quantized, then the bf16 values of positions from the start
        of start's group to end − 1 (the residual's earlier ones and this call's, rounded as the residual stores them)."""
        G, (H, d) = self.fmt.group, (self.k.shape[2], self.head_dim)
        whole, f0 = G * (end // G), G * (start // G)
        kc = unpack_nibbles(self.k[i, slot, :, :whole]).view(H, whole // G, G, d)
        kq = dequantize_asymmetric(kc, self.k_scale[i, slot, :, : whole // G, None], self.k_min[i, slot, :, : whole // G, None])
        vq = dequantize_asymmetric(unpack_nibbles(self.v[i, slot, :, :whole]), self.v_scale[i, slot, :, :whole, None],
                                   self.v_min[i, slot, :, :whole, None])
        kf = torch.cat([earlier[0], k_new.to(torch.bfloat16)], dim=1).float()
        vf = torch.cat([earlier[1], v_new.to(torch.bfloat16)], dim=1).float()
        position = torch.cat([torch.arange(whole), torch.arange(f0, end)])
        flags = torch.cat([torch.zeros(whole, dtype=torch.bool), torch.ones(end - f0, dtype=torch.bool)])
        return Entries(torch.cat([kq.reshape(H, whole, d), kf], dim=1), torch.cat([vq, vf], dim=1), position, flags)
