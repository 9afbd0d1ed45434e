"""Model support as data: where each family keeps its decoder blocks, and which op feeds which linears.

A family is supported when its decoder blocks form one ``ModuleList`` whose Linear layers are
the quantization targets; no per-family code. Activation-aware smoothing (AWQ) needs to know,
inside a block, which op's output channels feed which linears' input columns (:class:`Smoothing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from lowbit.errors import LowbitError
from lowbit.formats.gguf.metadata import GGUFArch


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

# fused q/k/v and gate/up projections: only the norms can smooth (v and up are slices of a fused output)
PHI3_SMOOTHING = (
    Smoothing("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
    Smoothing("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
)
# post-norm (OLMo 2) or one norm feeding attention and MLP in parallel (Cohere): no norm feeds only the
# linears after it, so only the linear → linear pairs smooth
LINEAR_PAIRS_SMOOTHING = (LLAMA_SMOOTHING[1], LLAMA_SMOOTHING[3])


@dataclass(frozen=True)
class BlockLayout:
    """The modules of one Llama-style decoder block, as paths inside the block, for the lean decoder.

    ``mlp_norm`` feeds the MLP; ``post_attn_norm``/``post_mlp_norm`` normalise a sublayer's output before
    the residual add (Gemma 2/3's sandwich norms); ``q_norm``/``k_norm`` are per-head norms (Qwen3, Gemma 3).
    """

    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    post_attn_norm: Optional[str] = None
    post_mlp_norm: Optional[str] = None
    q_norm: Optional[str] = None
    k_norm: Optional[str] = None

    @property
    def attention(self) -> str:
        """The attention module (where a KV cache's ``k_scale`` / ``v_scale`` live)."""
        return self.q.rpartition(".")[0]


QK_NORMS = dict(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
GEMMA3_LAYOUT = BlockLayout(mlp_norm="pre_feedforward_layernorm", post_attn_norm="post_attention_layernorm",
                            post_mlp_norm="post_feedforward_layernorm", **QK_NORMS)


@dataclass(frozen=True)
class Architecture:
    """All lowbit knows about a family, as dotted attribute paths from the CausalLM and a few facts.

    ``norm_offset``: the norm multiplies by (offset + weight) (Gemma: 1), which smoothing must respect.
    ``lean``: the block layout the lean decoder reads (None: the family decodes through transformers'
    forward); ``embed_scale``: embeddings are multiplied by √hidden_size; ``activation``: of the gated MLP;
    ``gguf``: how llama.cpp names it (None: not written to GGUF).
    """

    blocks: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"
    lm_head: str = "lm_head"
    smoothing: tuple[Smoothing, ...] = LLAMA_SMOOTHING
    norm_offset: float = 0.0
    lean: Optional[BlockLayout] = None
    embed_scale: bool = False
    activation: str = "silu"  # or "gelu_tanh"
    gguf: Optional[GGUFArch] = None


ARCHITECTURES: dict[str, Architecture] = {
    **{name: Architecture(lean=BlockLayout(), gguf=GGUFArch("llama", permute_qk=True)) for name in ("llama", "mistral")},
    "qwen2": Architecture(lean=BlockLayout(), gguf=GGUFArch("qwen2")),
    "qwen3": Architecture(lean=BlockLayout(**QK_NORMS), gguf=GGUFArch("qwen3")),
    **{name: Architecture() for name in ("granite", "smollm3")},  # multipliers, NoPE layers: transformers' forward
    "phi3": Architecture(smoothing=PHI3_SMOOTHING),
    **{name: Architecture(smoothing=LINEAR_PAIRS_SMOOTHING) for name in ("olmo2", "cohere")},
    "gemma": Architecture(norm_offset=1.0),
    "gemma2": Architecture(smoothing=GEMMA_SMOOTHING, norm_offset=1.0),
    "gemma3_text": Architecture(smoothing=GEMMA_SMOOTHING, norm_offset=1.0, lean=GEMMA3_LAYOUT, embed_scale=True,
                                activation="gelu_tanh", gguf=GGUFArch("gemma3")),
}


def architecture_for(model_type: Optional[str]) -> Architecture:
    """The record of a ``config.model_type``, or a message naming the supported ones."""
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise LowbitError(
            f"model type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return arch


def architecture_of(model: nn.Module) -> Architecture:
    return architecture_for(getattr(model.config, "model_type", None))


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(prefix, blocks) of a supported causal LM, e.g. ("model.layers", ModuleList)."""
    arch = architecture_of(model)
    return arch.blocks, model.get_submodule(arch.blocks)


def gguf_architecture(model: nn.Module) -> Architecture:
    """The model's family record, refused when llama.cpp's name for it is not known."""
    arch = architecture_of(model)
    if arch.gguf is None:
        known = sorted(name for name, a in ARCHITECTURES.items() if a.gguf is not None)
        raise LowbitError(f"{model.config.model_type} models are not written to GGUF (supported: {', '.join(known)})")
    return arch
