"""Model support as data: where each family keeps its decoder blocks.

A family is supported when its decoder blocks form one ``ModuleList`` whose Linear layers are
the quantization targets; no per-family code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Architecture:
    """Where a family keeps its parts, as dotted attribute paths from the CausalLM."""

    blocks: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"


ARCHITECTURES: dict[str, Architecture] = {
    name: Architecture()
    for name in (
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo2",
        "granite",
        "smollm3",
        "cohere",
    )
}


def architecture_of(model: nn.Module) -> Architecture:
    model_type = getattr(model.config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise LowbitError(
            f"model type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return arch


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(prefix, blocks) of a supported causal LM, e.g. ("model.layers", ModuleList)."""
    arch = architecture_of(model)
    return arch.blocks, model.get_submodule(arch.blocks)
