"""The portable decoder: transformers' own forward with its KV cache, for families the lean decoder lacks."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from lowbit.models.architectures import decoder_blocks
from lowbit.runtime.kernels import fast_linear
from lowbit.runtime.qlinear import QuantLinear


class HFDecoder(nn.Module):
    """``logits = decoder(ids [1, T], start)``, keeping a DynamicCache between calls."""

    def __init__(self, hf_model: nn.Module, max_len: int, quantize=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.max_len = max_len
        self.model = hf_model.to(dtype).eval()
        self.eos_token_id = getattr(hf_model.generation_config, "eos_token_id", None)
        try:
            _, blocks = decoder_blocks(hf_model)
        except Exception:
            blocks = hf_model
        for name, module in list(blocks.named_modules()):
            replacement = self._fast(module, quantize, dtype)
            if replacement is not None:
                parent, _, child = name.rpartition(".")
                setattr(blocks.get_submodule(parent) if parent else blocks, child, replacement)
        self.cache = None

    @staticmethod
    def _fast(module: nn.Module, quantize, dtype) -> Optional[nn.Module]:
        if isinstance(module, QuantLinear):
            return fast_linear(module.quantized_weight(), bias=module.bias, dtype=dtype)
        if isinstance(module, nn.Linear) and quantize is not None:
            return quantize(module.weight.detach(), module.bias, dtype)
        return None

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, start: int, last_only: bool = True) -> torch.Tensor:
        from transformers import DynamicCache

        if start == 0 or self.cache is None:
            self.cache = DynamicCache()
        positions = torch.arange(start, start + ids.shape[1])[None]
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, position_ids=positions)
        logits = out.logits[:, -1:] if last_only else out.logits
        return logits.float()
