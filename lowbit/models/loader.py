"""Resolve what the user named (embedded default, folder, GGUF file, hub id) into a model and tokenizer."""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse

import torch

from lowbit.errors import LowbitError
from lowbit.formats.compressed_tensors import RECORD_FILE, quantized_model
from lowbit.models.allocator import lean_loading
from lowbit.formats.gguf.reader import gguf_model, gguf_tokenizer
from lowbit.models.embedded import EMBEDDED, embedded_folder, embedded_gguf

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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype a model is loaded and computed in, by name, or a message naming the choices."""
    if name not in DTYPES:
        raise LowbitError(f"dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


FINITE_CHECK_ELEMENTS = 1 << 20  # checked at a time, so that the check's temporaries stay a few MB


def check_finite(name: str, t: torch.Tensor) -> None:
    """Refuse a tensor with NaN/Inf values, naming it: anything computed from it would be silently wrong."""
    if not t.is_floating_point():
        return
    if t.dtype == torch.float8_e4m3fn:  # no Inf; NaN is the bit pattern S.1111.111
        bad = sum(int(((p.view(torch.uint8) & 0x7F) == 0x7F).sum()) for p in t.reshape(-1).split(FINITE_CHECK_ELEMENTS))
    else:
        bad = sum(int((~torch.isfinite(part)).sum()) for part in t.reshape(-1).split(FINITE_CHECK_ELEMENTS))
    if bad:
        raise LowbitError(f"{name} has {bad} NaN/Inf values of {t.numel()}; the checkpoint is damaged")


def check_finite_model(model: torch.nn.Module) -> None:
    """:func:`check_finite` on every tensor of ``model``, tied ones (embedding = head) once."""
    seen = set()
    for name, t in model.state_dict().items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            check_finite(name, t)


def _hub_unreachable(timeout_s: float = 3.0) -> Optional[Exception]:
    """Why the hub cannot be reached (None: it answers a TCP connection), found in seconds rather than
    after the hub client's retries (52 s seen offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return OSError("HF_HUB_OFFLINE is set")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # through a proxy: only the hub client can tell
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s).close()
    except OSError as exc:
        return exc
    return None


def _tokenizer_loader(name: str, **kwargs) -> Callable[[], Any]:
    def load():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(name, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise LowbitError(f"could not load the tokenizer of {name}: {str(exc).splitlines()[0][:200]}") from None

    return load


def _load_pretrained(name: str, dtype, allow_pickle: bool, trust_remote_code: bool, local_files_only: bool = False):
    """(model, a function loading its tokenizer) of a transformers folder or hub id."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, use_safetensors=None if allow_pickle else True, **kwargs
    )
    return model.eval(), _tokenizer_loader(name, **kwargs)


def _hub_error(name: str, exc: Exception) -> LowbitError:
    return LowbitError(
        f"could not get {name!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})."
        f" To use it offline, download it where there is network (hf download {name} --local-dir DIR)"
        f" and pass DIR; or use a .gguf file or the embedded model {', '.join(EMBEDDED)}"
    )


def import_model_code(name: str) -> None:
    """Import the modelling code a local or embedded model needs, without loading weights.

    Memory measured after this is the model's own: transformers' Llama modules alone add ~130 MB
    of resident code and data to a process, whatever the model's size.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

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
    model, load_tokenizer, source = load_weights(name, dtype, allow_pickle, trust_remote_code)
    return model, load_tokenizer(), source


def load_weights(
    name: str,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """(model, a function loading its tokenizer, source): a caller that builds something from the model
    loads the tokenizer once the build's temporaries are gone (Gemma 3's tokenizer alone holds 0.3 GB).

    Every floating tensor is checked to be finite: a damaged file is an error naming the tensor, not a NaN result.
    """
    source = resolve(name)
    with lean_loading():
        model, load_tokenizer, source = _load(source, name, dtype, allow_pickle, trust_remote_code)
        check_finite_model(model)
    return model, load_tokenizer, source


def _load(source: ModelSource, name: str, dtype, allow_pickle: bool, trust_remote_code: bool):
    if source.kind == "gguf":
        return gguf_model(source.path, dtype), lambda: gguf_tokenizer(source.path), source
    if source.kind == "hub":
        try:
            model, load_tokenizer = _load_pretrained(name, dtype, allow_pickle, trust_remote_code, local_files_only=True)
            tokenizer = load_tokenizer()  # here: a tokenizer missing from the cache is asked of the hub too
            return model, lambda: tokenizer, source
        except (OSError, ValueError, LowbitError):
            pass  # not cached: ask the hub, if it can be reached
        unreachable = _hub_unreachable()
        if unreachable:
            raise _hub_error(name, unreachable)
        try:
            model, load_tokenizer = _load_pretrained(name, dtype, allow_pickle, trust_remote_code)
            tokenizer = load_tokenizer()
            return model, lambda: tokenizer, source
        except LowbitError:
            raise
        except (OSError, ValueError) as exc:
            raise _hub_error(name, exc) from None
    if source.kind == "embedded":
        source = ModelSource(name, "embedded", embedded_folder(name))
    folder = source.path
    check_safetensors(folder, allow_pickle)
    if is_compressed_tensors(folder):
        return quantized_model(folder, dtype), _tokenizer_loader(str(folder)), source
    try:
        return (*_load_pretrained(str(folder), dtype, allow_pickle, trust_remote_code), source)
    except (OSError, ValueError, KeyError) as exc:
        raise LowbitError(f"could not load {folder}: {str(exc).splitlines()[0][:200]}") from None


def gguf_tokenizer_file(model: str) -> Optional[Path]:
    """The GGUF file whose tokenizer a model's GGUF export carries: the model's own (a .gguf file or an embedded
    model), or, for a lowbit checkpoint, that of the model it was quantized from; None: there is none, and the
    Hugging Face tokenizer is converted."""
    source = resolve(model)
    if source.kind == "gguf":
        return source.path
    if source.kind == "embedded":
        return embedded_gguf(EMBEDDED[model])
    recipe = source.path / RECORD_FILE if source.kind == "folder" else None
    if recipe is not None and recipe.is_file():
        origin = json.loads(recipe.read_text()).get("source_model")
        if origin and origin != model:
            try:
                return gguf_tokenizer_file(origin)
            except LowbitError:  # moved or renamed since: the checkpoint's own tokenizer stands in
                return None
    return None
