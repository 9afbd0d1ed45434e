"""Read a GGUF file (llama.cpp's format) as a full-precision transformers model, through transformers' reader."""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.errors import LowbitError


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """:func:`gguf_model` and its tokenizer."""
    return gguf_model(path, dtype), gguf_tokenizer(path)


def gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise LowbitError(f"could not read the tokenizer of the GGUF file {path}: {str(exc).splitlines()[0][:200]}") from None


def gguf_model(path: Path, dtype: torch.dtype = torch.float32):
    """Dequantize a GGUF file to a full-precision transformers model."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except Exception as exc:
        raise LowbitError(f"could not read the GGUF file {path}: {str(exc).splitlines()[0][:200]}") from None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval()
