"""What a GGUF file says besides its tensors: the architecture's hyperparameters (from the transformers config,
under llama.cpp's key names) and the tokenizer as llama.cpp reads it.

The tokenizer is taken from a GGUF file of the same model where there is one, field for field (vocabulary, merges
or scores, token types, special ids, pre-tokenizer, chat template); otherwise the Hugging Face tokenizer is converted
(:mod:`lowbit.formats.gguf.tokenizer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from gguf import GGUFReader, GGUFValueType, GGUFWriter, RopeScalingType

from lowbit.errors import LowbitError

GEMMA3_SLIDING_THETA = 10000.0  # llama.cpp's gemma3 rotates its sliding-window layers with this base, fixed


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp knows a family: its architecture name, and whether llama.cpp's converter reorders the q and k
    projections' output rows (each head's two rotary halves to interleaved pairs), as GGUF files of it expect."""

    name: str
    permute_qk: bool = False


@dataclass(frozen=True)
class Field:
    """One key of a GGUF file with its value type (and element type for arrays)."""

    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: Optional[GGUFValueType] = None


def _rope(config) -> tuple[float, dict]:
    """(base frequency of the full-attention layers, their rope parameters) from either config layout."""
    params = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    if "full_attention" in params:
        sliding = params.get("sliding_attention", {}).get("rope_theta", GEMMA3_SLIDING_THETA)
        if sliding != GEMMA3_SLIDING_THETA:
            raise LowbitError(f"sliding-window layers with a RoPE base of {sliding}: llama.cpp fixes it at"
                              f" {GEMMA3_SLIDING_THETA:g}, so a GGUF file cannot hold this model")
        params = params["full_attention"]
    return float(params["rope_theta"]), params


def add_hyperparameters(writer: GGUFWriter, config, arch: GGUFArch) -> None:
    """The keys llama.cpp reads for the family, from a transformers config."""
    theta, rope = _rope(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(theta)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        writer.add_sliding_window(config.sliding_window)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind != "default":
        raise LowbitError(f"RoPE scaling {kind!r} is not written to GGUF yet (default and linear are)")


def tokenizer_fields(gguf_file: Path) -> list[Field]:
    """Every ``tokenizer.*`` key of a GGUF file, with its type."""
    reader = GGUFReader(gguf_file)
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        fields.append(Field(key, field.contents(), vtype, sub_type))
    if not any(f.key == "tokenizer.ggml.model" for f in fields):
        raise LowbitError(f"{gguf_file} holds no tokenizer (no tokenizer.ggml.model)")
    return fields


def add_fields(writer: GGUFWriter, fields: list[Field]) -> None:
    for f in fields:
        writer.add_key_value(f.key, f.value, f.vtype, f.sub_type)
