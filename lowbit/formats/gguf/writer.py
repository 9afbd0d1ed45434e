"""Write a lowbit model as a GGUF file that llama.cpp runs as it is.

Tensors get llama.cpp's names (gguf-py's own name map for the family) and types:

- quantized linears: their codes and scales in the block type that holds their grid exactly (:mod:`.blocks`);
  a grid no type holds is refused, naming the types;
- full-precision matrices (the embedding table, an untied or ignored output projection, any linear left in
  full precision): ``dense_type`` by llama.cpp's own rounding (Q8_0 by default, as llama.cpp's converter
  writes the embedding table of such files), float16 where the row width is not a multiple of 32;
- vectors (norms, biases): float32; Gemma's norms as 1 + w, the form llama.cpp multiplies by.

Llama-style families get the q/k output-row permutation llama.cpp's converter applies; quantized rows move with
their scales, so it is exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFWriter, LlamaFileType, get_tensor_name_map

from lowbit.errors import LowbitError
from lowbit.formats.gguf.blocks import BLOCK, TYPES, block_type_for, encode, round_to_nearest
from lowbit.formats.gguf.metadata import Field, add_fields, add_hyperparameters
from lowbit.quantized.modules import QuantEmbedding, QuantLinear
from lowbit.schemes.grid import QuantizedWeight

FILE_TYPES = {"Q4_0": LlamaFileType.MOSTLY_Q4_0, "Q4_1": LlamaFileType.MOSTLY_Q4_1, "Q8_0": LlamaFileType.MOSTLY_Q8_0}
DENSE_TYPES = ("Q8_0", "F16", "F32")


@dataclass
class Written:
    """What went into the file: tensor counts by type, and the quantized linears' type."""

    path: Path
    types: dict[str, int] = field(default_factory=dict)
    file_type: str = "F32"


def _row_order(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp's converter's q/k permutation as a row index: out row (h, j, t) ← in row (h, t, j), j < 2."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _take_rows(qw: QuantizedWeight, order: torch.Tensor) -> QuantizedWeight:
    zp = None if qw.zero_point is None else qw.zero_point[order]
    return QuantizedWeight(qw.q[order], qw.scale[order], zp, qw.args)


def unrepresentable(model: nn.Module) -> list[str]:
    """The quantized linears whose grid no GGUF type holds exactly, as "name: grid"."""
    return [f"{name}: {m.args.describe()}" for name, m in model.named_modules()
            if isinstance(m, (QuantLinear, QuantEmbedding)) and block_type_for(m.args, m.weight_q.shape[1]) is None]


def check_dense_type(dense_type: str) -> None:
    if dense_type not in DENSE_TYPES:
        raise LowbitError(f"full-precision tensors as {dense_type!r}? choose one of {', '.join(DENSE_TYPES)}")


def check_representable(model: nn.Module) -> None:
    bad = unrepresentable(model)
    if bad:
        kinds = "; ".join(f"{t.name} is {t.describe()}" for t in TYPES.values())
        raise LowbitError(f"{len(bad)} quantized layers have a grid no GGUF type holds exactly ({bad[0]}"
                          f"{', …' if len(bad) > 1 else ''}): {kinds}. Quantize again with --gguf TYPE")


class _Tensors:
    """Turns a model's modules into named GGUF tensors, in order."""

    def __init__(self, model: nn.Module, arch, dense_type: str):
        config = model.config
        self.arch, self.dense_type = arch, dense_type
        self.names = get_tensor_name_map(_model_arch(arch.gguf.name), config.num_hidden_layers)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        lay = arch.lean
        self.heads_of = {lay.q: heads, lay.k: kv_heads} if arch.gguf.permute_qk else {}
        self.types: dict[str, int] = {}

    def gguf_name(self, name: str) -> str:
        out = self.names.get_name(name, try_suffixes=(".weight", ".bias"))
        if out is None:
            raise LowbitError(f"no GGUF name for {name} in llama.cpp's {self.arch.gguf.name} architecture")
        return out

    def _order(self, module_name: str, rows: int) -> Optional[torch.Tensor]:
        for path, heads in self.heads_of.items():
            if module_name.endswith("." + path):
                return _row_order(rows, heads)
        return None

    def quantized(self, name: str, qw: QuantizedWeight) -> tuple[str, np.ndarray, GGMLQuantizationType]:
        kind = block_type_for(qw.args, qw.shape[1])
        order = self._order(name, qw.shape[0])
        blocks = encode(qw if order is None else _take_rows(qw, order), kind)
        self._count(kind.name)
        return self.gguf_name(name + ".weight"), blocks, kind.qtype

    def dense(self, name: str, weight: torch.Tensor, module_name: str = "") -> tuple[str, np.ndarray, GGMLQuantizationType]:
        w = weight.detach().float()
        order = self._order(module_name, w.shape[0]) if module_name else None
        if order is not None:  # a q or k projection's weight or bias
            w = w[order]
        if w.dim() == 1:
            if name.endswith("norm.weight") and self.arch.norm_offset:
                w = w + self.arch.norm_offset
            self._count("F32")
            return self.gguf_name(name), w.contiguous().numpy(), GGMLQuantizationType.F32
        kind = self.dense_type if w.shape[1] % BLOCK == 0 or self.dense_type == "F32" else "F16"
        self._count(kind)
        if kind == "F32":
            return self.gguf_name(name), w.contiguous().numpy(), GGMLQuantizationType.F32
        if kind == "F16":
            return self.gguf_name(name), w.half().contiguous().numpy(), GGMLQuantizationType.F16
        qtype = GGMLQuantizationType[kind]
        return self.gguf_name(name), round_to_nearest(w, qtype), qtype

    def _count(self, kind: str) -> None:
        self.types[kind] = self.types.get(kind, 0) + 1

    def of(self, model: nn.Module):
        """(gguf name, data, type) for every tensor llama.cpp needs, a tied output projection once."""
        head = model.get_submodule(self.arch.lm_head)
        table = model.get_submodule(self.arch.embed)
        codes = getattr(head, "weight_q", None)
        tied = getattr(head, "weight", None) is getattr(table, "weight", object()) or (
            codes is not None and codes is getattr(table, "weight_q", None))
        for name, module in model.named_modules():
            if tied and name == self.arch.lm_head:
                continue
            if isinstance(module, (QuantLinear, QuantEmbedding)):
                yield self.quantized(name, module.quantized_weight())
                if getattr(module, "bias", None) is not None:
                    yield self.dense(name + ".bias", module.bias, name)
                continue
            for pname, p in module.named_parameters(recurse=False):
                yield self.dense(f"{name}.{pname}", p, name)


def _model_arch(name: str):
    return next(a for a, n in MODEL_ARCH_NAMES.items() if n == name)


def write_gguf(model: nn.Module, arch, path: Path, tokenizer: list[Field], name: str, dense_type: str = "Q8_0",
               record: Optional[dict] = None) -> Written:
    """Write ``model`` (full precision or with lowbit's quantized linears) to ``path`` with the tokenizer fields and,
    under ``lowbit.recipe``, how it was made. ``arch``: the family's record
    (:class:`lowbit.models.architectures.Architecture`, its ``gguf`` set)."""
    check_dense_type(dense_type)
    check_representable(model)
    tensors = _Tensors(model, arch, dense_type)
    writer = GGUFWriter(path, arch.gguf.name)
    writer.add_name(name)
    add_hyperparameters(writer, model.config, arch.gguf)
    add_fields(writer, tokenizer)
    if record:
        writer.add_string("lowbit.recipe", json.dumps(record))
    with torch.no_grad():
        for gguf_name, data, qtype in tensors.of(model):
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    linear = {k: v for k, v in tensors.types.items() if k in FILE_TYPES}
    file_type = max(linear, key=linear.get) if linear else ("F16" if dense_type == "F16" else "F32")
    writer.add_file_type(FILE_TYPES.get(file_type, LlamaFileType.MOSTLY_F16 if file_type == "F16" else LlamaFileType.ALL_F32))
    writer.add_quantization_version(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Written(Path(path), dict(tensors.types), file_type)
