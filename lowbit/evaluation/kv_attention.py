"""Evaluation through a KV cache format: transformers' attention reading K and V as lowbit's runtime stores them
(:mod:`lowbit.schemes.kv_cache`), so that perplexity and task accuracy measure the cache the runtime runs.

A registered attention function (transformers' ``AttentionInterface``) replaces K and V by what the cache
reconstructs: bf16-rounded, int8 / fp8 per position and head (int8 keys per block of 32 channels, read by
the query quantized as the runtime quantizes it; fp8 with the attention's calibrated static
``k_scale`` / ``v_scale`` where the checkpoint has them, as the runtime uses them), or int4 KIVI, where a query at position t reads
the whole groups of G positions stored by then quantized and the rest in bf16. Each row's positions come from
``position_ids`` (0 … S − 1 without them), so windows and rows packed with several requests are grouped as the
runtime would group each sequence; columns no query sees (padding) join no group.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lowbit.errors import LowbitError
from lowbit.schemes.kv_cache import (
    SCALE_NAMES,
    asymmetric_codes,
    asymmetric_params,
    dequantize_asymmetric,
    dequantize_tokens,
    kv_format,
    quantize_asymmetric,
    quantize_query,
    quantize_tokens,
)

NAME = "lowbit_kv_cache"
CONFIG_KEY = "lowbit_kv_cache"  # the format's name, on the model's (text) config


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def _keys_by_group(k: torch.Tensor, group: torch.Tensor, n: int) -> torch.Tensor:
    """Keys [B, H, S, d] quantized per channel over the columns sharing a group id [B, S] (id n: no group)."""
    B, H, S, d = k.shape
    index = group[:, None, :, None].expand(B, H, S, d)
    lo = torch.full((B, H, n + 1, d), float("inf")).scatter_reduce(2, index, k, "amin", include_self=False)
    hi = torch.full((B, H, n + 1, d), float("-inf")).scatter_reduce(2, index, k, "amax", include_self=False)
    s, m = asymmetric_params(lo.clamp(-65504, 65504), hi.clamp(-65504, 65504))
    s, m = s.gather(2, index), m.gather(2, index)
    return dequantize_asymmetric(asymmetric_codes(k, s, m), s, m)


def _causal(T: int, S: int) -> torch.Tensor:
    return torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)[None, None]


def kv_cache_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       **kwargs):
    """transformers' SDPA attention over K and V as the configured cache format reconstructs them."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    fmt = kv_format(getattr(module.config, CONFIG_KEY))
    T, S = query.shape[2], key.shape[2]
    mask = _causal(T, S) if attention_mask is None else attention_mask
    mask = mask if mask.dtype == torch.bool else mask == 0
    key, value = key.float(), value.float()
    if fmt.name == "bf16":
        key, value = _bf16(key), _bf16(value)
    elif fmt.name == "fp8" and getattr(module, SCALE_NAMES[0], None) is not None:  # the checkpoint's static scales
        key, value = (dequantize_tokens(*quantize_tokens(x, fmt, float(s)), float(s))
                      for x, s in ((key, module.k_scale), (value, module.v_scale)))
    elif fmt.per_token:
        block = fmt.key_block_of(key.shape[-1])
        key = dequantize_tokens(*quantize_tokens(key, fmt, block=block), block=block)
        value = dequantize_tokens(*quantize_tokens(value, fmt))
        query = quantize_query(query, fmt)
    else:
        key, value, mask = _int4(key, value, mask, kwargs.get("position_ids"), fmt.group)
    return sdpa_attention_forward(module, query, key.to(query.dtype), value.to(query.dtype), mask, dropout=dropout,
                                  scaling=scaling, is_causal=False)


def _int4(key, value, mask, position_ids, G: int):
    """Both copies of K and V (quantized, then bf16) side by side, and the mask choosing per query which it reads."""
    B, H, S, d = key.shape
    T = mask.shape[-2]
    if T != S:
        raise LowbitError("int4 KV cache evaluation scores whole sequences (no cache between forwards)")
    pos = (torch.arange(S)[None] if position_ids is None else position_ids).expand(B, S)
    seen = mask.expand(B, 1, T, S).any(dim=2)[:, 0]  # [B, S]: columns some query reads (not padding)
    segment = torch.cumsum(torch.cat([torch.ones(B, 1, dtype=torch.long), (pos[:, 1:] <= pos[:, :-1]).long()], 1), 1)
    gid = segment * (S // G + 2) + pos // G  # one id per (sequence in the row, group)
    _, gid = torch.unique(gid, return_inverse=True)
    n = int(gid.max()) + 1
    gid = torch.where(seen, gid, n)
    kf, vf = _bf16(key), _bf16(value)
    kq = _keys_by_group(kf, gid, n)
    vq = dequantize_asymmetric(*quantize_asymmetric(vf, dim=-1))
    bound = G * torch.div(pos + 1, G, rounding_mode="floor")  # [B, T]: positions below it read quantized
    quantized = (pos[:, None, :] < bound[:, :, None])[:, None]  # [B, 1, T, S]
    both = torch.cat([mask & quantized, mask & ~quantized], dim=-1)
    return torch.cat([kq, kf], dim=2), torch.cat([vq, vf], dim=2), both


def use_kv_cache_format(model: nn.Module, name: str) -> None:
    """Make ``model``'s attention read K and V as the ``name`` cache format stores them."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    kv_format(name)
    AttentionInterface.register(NAME, kv_cache_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        setattr(config, CONFIG_KEY, name)
    model.set_attn_implementation(NAME)
