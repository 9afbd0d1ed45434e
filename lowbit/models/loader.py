"""Resolve what the user named (embedded default, folder, GGUF file, hub id) into a model and tokenizer."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lowbit.errors import LowbitError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is embedded, folder, gguf or hub; ``path`` is its local
    folder or file (for an embedded model, its cached folder once loaded; None for a hub id)."""

    name: str
    kind: str
    path: Optional[Path]

    @property
    def quantized(self) -> bool:
        return self.kind == "folder" and is_compressed_tensors(self.path)


def is_compressed_tensors(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors"


def resolve(name: str) -> ModelSource:
    """Classify a model name without loading anything."""
    from lowbit.models.embedded import EMBEDDED

    if name in EMBEDDED:
        return ModelSource(name, "embedded", None)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name, "gguf", path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LowbitError(f"{path} is not a model folder (no config.json)")
        return ModelSource(name, "folder", path)
    if path.exists():
        raise LowbitError(f"{path} is neither a model folder nor a .gguf file")
    if HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return ModelSource(name, "hub", None)
    raise LowbitError(
        f"no model {name!r}: not a folder, .gguf file, hub id (org/name) or embedded model"
        f" (embedded: {', '.join(EMBEDDED)})"
    )


def check_safetensors(folder: Path, allow_pickle: bool = False) -> None:
    """Refuse pickle checkpoints unless allowed, and corrupt or truncated safetensors files."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickles and not allow_pickle:
            raise LowbitError(
                f"{folder} has only pickle weights ({pickles[0]}), which can run arbitrary code when loaded;"
                " pass --allow-pickle if you trust them"
            )
        if not pickles:
            raise LowbitError(f"{folder} has no weight files (*.safetensors)")
        return
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as exc:
            raise LowbitError(f"{file} is corrupt or truncated ({str(exc).splitlines()[0][:120]})") from None


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """Dequantize a GGUF file to a full-precision transformers model (and its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except Exception as exc:
        raise LowbitError(f"could not read the GGUF file {path}: {str(exc).splitlines()[0][:200]}") from None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tokenizer


def _load_pretrained(name: str, dtype, allow_pickle: bool, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, use_safetensors=None if allow_pickle else True, **kwargs
    )
    return model.eval(), tokenizer


def _hub_error(name: str, exc: Exception) -> LowbitError:
    from lowbit.models.embedded import EMBEDDED

    return LowbitError(
        f"could not get {name!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})."
        f" To use it offline, download it where there is network (huggingface-cli download {name} --local-dir DIR)"
        f" and pass DIR; or use a .gguf file or the embedded model {', '.join(EMBEDDED)}"
    )


def import_model_code(name: str) -> None:
    """Import the modelling code a local or embedded model needs, without loading weights.

    Memory measured after this is the model's own: transformers' Llama modules alone add ~130 MB
    of resident code and data to a process, whatever the model's size.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from lowbit.models.embedded import embedded_folder

    source = resolve(name)
    folder = embedded_folder(name) if source.kind == "embedded" else source.path
    if source.kind in ("embedded", "folder"):
        config = AutoConfig.from_pretrained(folder)
        MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)


def load_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """(model, tokenizer, source) for any model lowbit accepts; lowbit checkpoints load quantized."""
    from lowbit.models.embedded import embedded_folder

    source = resolve(name)
    if source.kind == "gguf":
        return (*load_gguf(source.path, dtype), source)
    if source.kind == "hub":
        try:
            return (*_load_pretrained(name, dtype, allow_pickle, trust_remote_code), source)
        except LowbitError:
            raise
        except (OSError, ValueError) as exc:
            raise _hub_error(name, exc) from None
    if source.kind == "embedded":
        source = ModelSource(name, "embedded", embedded_folder(name))
    folder = source.path
    check_safetensors(folder, allow_pickle)
    if is_compressed_tensors(folder):
        from lowbit.formats.compressed_tensors import load_quantized

        model, tokenizer = load_quantized(folder, dtype)
        return model, tokenizer, source
    try:
        return (*_load_pretrained(str(folder), dtype, allow_pickle, trust_remote_code), source)
    except (OSError, ValueError, KeyError) as exc:
        raise LowbitError(f"could not load {folder}: {str(exc).splitlines()[0][:200]}") from None
