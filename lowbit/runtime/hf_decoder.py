"""The portable decoder: transformers' own forward with its KV cache, for families the lean decoder lacks."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from lowbit.models.architectures import decoder_blocks
from lowbit.quantized.modules import QuantLinear, replace_module
from lowbit.runtime.cpu import compute_dtype
from lowbit.runtime.kernels import FastLinear, fast_linear, input_quantization, kernels_by_kind


class HFDecoder(nn.Module):
    """``logits = decoder(ids [1, T], start)``, keeping a DynamicCache between calls."""

    def __init__(self, hf_model: nn.Module, max_len: int, quantize=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        dtype = dtype or compute_dtype()
        self.max_len = max_len
        self.dtype = dtype
        self.model = hf_model.to(dtype).eval()
        self.eos_token_id = getattr(hf_model.generation_config, "eos_token_id", None)
        try:
            _, blocks = decoder_blocks(hf_model)
        except Exception:
            blocks = hf_model
        for name, module in list(blocks.named_modules()):
            replacement = self._fast(module, quantize, dtype)
            if replacement is not None:
                replace_module(blocks, name, replacement)
        self.cache = None

    @staticmethod
    def _fast(module: nn.Module, quantize, dtype) -> Optional[nn.Module]:
        if isinstance(module, QuantLinear):
            return fast_linear(module.quantized_weight(), bias=module.bias, dtype=dtype,
                               inputs=input_quantization([module]))
        if isinstance(module, nn.Linear) and quantize is not None:
            return quantize(module.weight.detach(), module.bias, dtype)
        return None

    def projections(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every Linear lowbit swapped in."""
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, FastLinear)]

    def kernels(self) -> dict[str, str]:
        """Which kernel each kind of projection runs, and how a decode step runs."""
        report = kernels_by_kind(self.projections())
        report["decode step"] = f"transformers forward ({self.model.config.model_type} has no lean decoder)"
        return report

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, start: int, last_only: bool = True) -> torch.Tensor:
        from transformers import DynamicCache

        if start == 0 or self.cache is None:
            self.cache = DynamicCache()
        positions = torch.arange(start, start + ids.shape[1])[None]
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, position_ids=positions)
        logits = out.logits[:, -1:] if last_only else out.logits
        return logits.float()
