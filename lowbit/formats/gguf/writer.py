"""Write a lowbit model as a GGUF file that llama.cpp runs as it is.

Tensors get llama.cpp's names (gguf-py's own name map for the family) and types:

- linears on one of llama.cpp's grids (:class:`GGMLLinear`, made by ``lowbit quantize --gguf``): their codes and
  block scales as they are;
- linears on a lowbit grid: the type that holds it code for code (:mod:`.blocks` ``EXACT``); a grid no type
  holds is refused, naming the types;
- other matrices (the embedding table, an untied output projection, linears left in full precision): the type
  the file type's rules give them (:mod:`.presets`, llama.cpp's own rounding where gguf-py has it), or
  ``dense_type`` (Q8_0, F16, F32) when asked; float16 where the row width is not a multiple of 32;
- vectors (norms, biases): float32; Gemma's norms as 1 + w, the form llama.cpp multiplies by.

Llama-style families get the q/k output-row permutation llama.cpp's converter applies; quantized rows move with
their scales, so it is exact.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFWriter, LlamaFileType, get_tensor_name_map

from lowbit.errors import LowbitError
from lowbit.formats.gguf.blocks import BLOCK, encode, exact_type, exact_types_described, from_grid, qtype, round_to_nearest
from lowbit.formats.gguf.metadata import Field, add_fields, add_hyperparameters
from lowbit.formats.gguf.presets import PRESETS, Tensor, file_type, tensor_types
from lowbit.quantized.modules import GGMLLinear, QuantEmbedding, QuantLinear
from lowbit.schemes.ggml import TYPES, GGMLType, GGMLWeight

DENSE_TYPES = ("Q8_0", "F16", "F32")
QUANTIZED = (QuantLinear, QuantEmbedding, GGMLLinear)


@dataclass
class Written:
    """What went into the file: tensor counts by type, the file type, and the decoder linears' bits per weight."""

    path: Path
    types: dict[str, int] = field(default_factory=dict)
    file_type: str = "F32"
    bits_per_weight: float = float("nan")


def _row_order(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp's converter's q/k permutation as a row index: out row (h, j, t) ← in row (h, t, j), j < 2."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _take_rows(w: GGMLWeight, order: torch.Tensor) -> GGMLWeight:
    """The weight with its rows (and their block scales) in ``order``."""
    pick = [None if x is None else x[order] for x in (w.c, w.d, w.sc, w.dmin, w.m)]
    return GGMLWeight(*pick, w.kind)


def _as_ggml(module: nn.Module) -> GGMLWeight:
    qw = module.quantized_weight()
    return qw if isinstance(qw, GGMLWeight) else from_grid(qw)


def unrepresentable(model: nn.Module) -> list[str]:
    """The lowbit-grid linears whose grid no GGUF type holds exactly, as "name: grid"."""
    return [f"{name}: {m.args.describe()}" for name, m in model.named_modules()
            if isinstance(m, (QuantLinear, QuantEmbedding)) and exact_type(m.args, m.weight_q.shape[1]) is None]


def check_dense_type(dense_type: Optional[str]) -> None:
    if dense_type is not None and dense_type not in DENSE_TYPES:
        raise LowbitError(f"full-precision tensors as {dense_type!r}? choose one of {', '.join(DENSE_TYPES)}")


def check_representable(model: nn.Module) -> None:
    bad = unrepresentable(model)
    if bad:
        raise LowbitError(f"{len(bad)} quantized layers have a grid no GGUF type holds exactly ({bad[0]}"
                          f"{', …' if len(bad) > 1 else ''}): {exact_types_described()}. Quantize again with --gguf TYPE")


class Names:
    """llama.cpp's name for each of a model's tensors, and the q/k output-row order its converter writes."""

    def __init__(self, model: nn.Module, arch):
        config = model.config
        self.arch = arch
        self.names = get_tensor_name_map(_model_arch(arch.gguf.name), config.num_hidden_layers)
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        lay = arch.lean
        self.heads_of = {lay.q: self.heads, lay.k: self.kv_heads} if arch.gguf.permute_qk else {}

    def gguf_name(self, name: str) -> str:
        out = self.names.get_name(name, try_suffixes=(".weight", ".bias"))
        if out is None:
            raise LowbitError(f"no GGUF name for {name} in llama.cpp's {self.arch.gguf.name} architecture")
        return out

    def row_order(self, module_name: str, rows: int) -> Optional[torch.Tensor]:
        """File row r holds the module's row ``order[r]`` (None: the rows are in the module's order)."""
        for path, heads in self.heads_of.items():
            if module_name.endswith("." + path):
                return _row_order(rows, heads)
        return None


class _Tensors(Names):
    """Turns a model's modules into named GGUF tensors, in order, each matrix in its planned type."""

    def __init__(self, model: nn.Module, arch, preset: Optional[str] = None, dense_type: Optional[str] = None):
        super().__init__(model, arch)
        head, table = model.get_submodule(arch.lm_head), model.get_submodule(arch.embed)
        codes = getattr(head, "weight_q", None)
        self.tied = getattr(head, "weight", None) is getattr(table, "weight", object()) or (
            codes is not None and codes is getattr(table, "weight_q", None))
        self.preset = preset or _implied_preset(model)
        self.dense_type = dense_type or (None if self.preset else "Q8_0")
        self.plan = {} if self.preset is None else tensor_types(
            self.preset, list(self.matrices(model)), model.config.num_hidden_layers, self.heads // self.kv_heads,
            self.tied)
        self.types: Counter = Counter()
        self.block_bits = self.block_weights = 0

    def _walk(self, model: nn.Module):
        """(name, module) of every module whose tensors go into the file; a tied output projection not again."""
        for name, module in model.named_modules():
            if not (self.tied and name == self.arch.lm_head):
                yield name, module

    def matrices(self, model: nn.Module):
        """A :class:`Tensor` per matrix the file holds, for the file type's rules."""
        for name, module in self._walk(model):
            if isinstance(module, QUANTIZED):
                yield Tensor(self.gguf_name(name + ".weight"), module.quantized_weight().shape[1])
                continue
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() == 2:
                    yield Tensor(self.gguf_name(f"{name}.{pname}"), p.shape[1])

    def quantized(self, name: str, module: nn.Module) -> tuple[str, np.ndarray, GGMLQuantizationType]:
        w = _as_ggml(module)
        order = self.row_order(name, w.shape[0])
        gguf_name = self.gguf_name(name + ".weight")
        return self._add(gguf_name, encode(w if order is None else _take_rows(w, order)), w.kind, w.c.numel())

    def dense(self, name: str, weight: torch.Tensor, module_name: str = "") -> tuple[str, np.ndarray, GGMLQuantizationType]:
        w = weight.detach().float()
        order = self.row_order(module_name, w.shape[0]) if module_name else None
        if order is not None:  # a q or k projection's weight or bias
            w = w[order]
        gguf_name = self.gguf_name(name)
        if w.dim() == 1:
            if name.endswith("norm.weight") and self.arch.norm_offset:
                w = w + self.arch.norm_offset
            return self._add(gguf_name, w.contiguous().numpy(), "F32", w.numel())
        kind = self._dense_kind(gguf_name, w.shape[1])
        if isinstance(kind, GGMLType):
            return self._add(gguf_name, round_to_nearest(w, kind), kind, w.numel())
        data = w.contiguous().numpy() if kind == "F32" else w.half().contiguous().numpy()
        return self._add(gguf_name, data, kind, w.numel())

    def _dense_kind(self, gguf_name: str, columns: int):
        """A GGMLType, or "F16"/"F32"."""
        if self.dense_type is None:
            return self.plan[gguf_name] or "F16"
        if self.dense_type == "F32" or (self.dense_type != "F16" and columns % BLOCK == 0):
            return TYPES.get(self.dense_type, self.dense_type)
        return "F16"

    def _add(self, gguf_name: str, data: np.ndarray, kind, numel: int):
        name = kind.name if isinstance(kind, GGMLType) else kind
        self.types[name] += 1
        if gguf_name.startswith("blk.") and data.ndim == 2:
            self.block_bits += data.nbytes * 8
            self.block_weights += numel
        return gguf_name, data, qtype(kind) if isinstance(kind, GGMLType) else GGMLQuantizationType[kind]

    def of(self, model: nn.Module):
        """(gguf name, data, type) for every tensor llama.cpp needs."""
        for name, module in self._walk(model):
            if isinstance(module, QUANTIZED):
                yield self.quantized(name, module)
                if getattr(module, "bias", None) is not None:
                    yield self.dense(name + ".bias", module.bias, name)
                continue
            for pname, p in module.named_parameters(recurse=False):
                yield self.dense(f"{name}.{pname}", p, name)

    def file_type(self) -> tuple[str, LlamaFileType]:
        if self.preset:
            return self.preset, file_type(self.preset)
        return ("F16", LlamaFileType.MOSTLY_F16) if self.dense_type == "F16" else ("F32", LlamaFileType.ALL_F32)


def _implied_preset(model: nn.Module) -> Optional[str]:
    """The file type of a model whose linears are quantized: their most common type (None: none are)."""
    kinds = Counter(_as_ggml(m).kind.name if isinstance(m, GGMLLinear) else exact_type(m.args, m.weight_q.shape[1]).name
                    for m in model.modules() if isinstance(m, (QuantLinear, GGMLLinear)))
    name = kinds.most_common(1)[0][0] if kinds else None
    return name if name in PRESETS else None


def _model_arch(name: str):
    return next(a for a, n in MODEL_ARCH_NAMES.items() if n == name)


def linear_types(model: nn.Module, arch, preset: str) -> dict[str, Optional[GGMLType]]:
    """The type of each Linear of ``model`` (module name → type; None: F16) in a ``preset`` file."""
    tensors = _Tensors(model, arch, preset)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not (tensors.tied and name == arch.lm_head):
            out[name] = tensors.plan[tensors.gguf_name(name + ".weight")]
    return out


def write_gguf(model: nn.Module, arch, path: Path, tokenizer: list[Field], name: str, dense_type: Optional[str] = None,
               record: Optional[dict] = None, preset: Optional[str] = None) -> Written:
    """Write ``model`` (full precision or with lowbit's quantized linears) to ``path`` with the tokenizer fields and,
    under ``lowbit.recipe``, how it was made. ``arch``: the family's record
    (:class:`lowbit.models.architectures.Architecture`, its ``gguf`` set). ``preset``: the llama.cpp file type
    whose rules type the matrices no method rounded (default: that of the quantized linears)."""
    check_dense_type(dense_type)
    check_representable(model)
    tensors = _Tensors(model, arch, preset, dense_type)
    writer = GGUFWriter(path, arch.gguf.name)
    writer.add_name(name)
    add_hyperparameters(writer, model.config, arch.gguf)
    add_fields(writer, tokenizer)
    if record:
        writer.add_string("lowbit.recipe", json.dumps(record))
    with torch.no_grad():
        for gguf_name, data, kind in tensors.of(model):
            writer.add_tensor(gguf_name, data, raw_dtype=kind)
    label, ftype = tensors.file_type()
    writer.add_file_type(ftype)
    writer.add_quantization_version(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    bpw = tensors.block_bits / tensors.block_weights if tensors.block_weights else float("nan")
    return Written(Path(path), dict(tensors.types), label, bpw)
