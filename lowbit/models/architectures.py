"""Model support as data: where each family keeps its decoder blocks, and which op feeds which linears.

A family is supported when its decoder blocks form one ``ModuleList`` whose Linear layers are
the quantization targets; no per-family code. Activation-aware smoothing (AWQ) needs to know,
inside a block, which op's output channels feed which linears' input columns (:class:`Smoothing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Smoothing:
    """Per-channel scales s can move between ``previous`` (a norm or a Linear, path inside a block)
    and the ``balance`` Linears it feeds: previous's output channels ÷ s, balance's input columns × s.
    ``inspect`` is the smallest module whose output shows the effect (where AWQ measures error)."""

    previous: str
    balance: tuple[str, ...]
    inspect: str


LLAMA_SMOOTHING = (
    Smoothing("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    Smoothing("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    Smoothing("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    Smoothing("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
GEMMA_SMOOTHING = (
    LLAMA_SMOOTHING[0],
    LLAMA_SMOOTHING[1],
    Smoothing("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    LLAMA_SMOOTHING[3],
)


@dataclass(frozen=True)
class Architecture:
    """Where a family keeps its parts, as dotted attribute paths from the CausalLM.

    ``norm_offset``: the norm multiplies by (offset + weight) (Gemma: 1), which smoothing must respect.
    """

    blocks: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    smoothing: tuple[Smoothing, ...] = LLAMA_SMOOTHING
    norm_offset: float = 0.0


ARCHITECTURES: dict[str, Architecture] = {
    **{
        name: Architecture()
        for name in ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite", "smollm3", "cohere")
    },
    "gemma": Architecture(norm_offset=1.0),
    **{name: Architecture(smoothing=GEMMA_SMOOTHING, norm_offset=1.0) for name in ("gemma2", "gemma3_text")},
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
