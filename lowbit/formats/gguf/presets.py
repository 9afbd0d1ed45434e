"""llama.cpp's file types (``llama-quantize`` presets) as a type per tensor, by llama.cpp's own rules.

A preset names a default type and bumps some tensors up (llama-quant.cpp, ``llama_tensor_get_type``): the output
projection (or a tied embedding table) gets Q6_K; Q4_K_M gives ``attn_v`` and ``ffn_down`` Q6_K in the layers
``use_more_bits`` picks; Q3_K_M and Q2_K lift ``attn_v``, ``attn_output`` and ``ffn_down``. A K-quant needs rows of
a multiple of 256 weights; where a tensor's are not, llama.cpp falls back to a block-32 type (Q4_K → Q5_0,
Q5_K → Q5_1, Q6_K → Q8_0, Q2_K/Q3_K → Q4_0), and to F16 where even 32 does not divide. The rules written here are
those of dense models (no experts), for the presets listed in ``PRESETS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from gguf import LlamaFileType

from lowbit.errors import LowbitError
from lowbit.schemes.args import QuantizationScheme, make_scheme
from lowbit.schemes.ggml import TYPES, GGMLType

PRESETS = {  # file type → default type
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
    "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")


@dataclass(frozen=True)
class Tensor:
    """What the rules look at: the GGUF name (``blk.3.attn_v.weight``) and the row width."""

    name: str
    columns: int


def file_type(preset: str) -> LlamaFileType:
    return LlamaFileType[f"MOSTLY_{preset}"]


def check_preset(preset: str) -> str:
    name = preset.upper()
    if name not in PRESETS:
        raise LowbitError(f"GGUF type {preset!r} is not written by lowbit; choose one of {', '.join(PRESETS)}")
    return name


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _bumped(preset: str, default: str, role: str, i: int, n: int, n_gqa: int) -> str:
    """llama.cpp's choice for a block tensor before the width check (``role``: attn_v, ffn_down, …)."""
    if role == "attn_v":
        if preset == "Q2_K":
            return "Q4_K" if n_gqa >= 4 else "Q3_K"
        if preset == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        if preset == "Q3_K_L":
            return "Q5_K"
        if preset in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            return "Q6_K"
        if preset == "Q4_K_S" and i < 4:
            return "Q5_K"
    elif role == "ffn_down":
        if preset == "Q2_K":
            return "Q3_K"
        if preset == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if preset == "Q3_K_L":
            return "Q5_K"
        if preset in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            return "Q6_K"
        if preset == "Q4_K_S" and i < n // 8:
            return "Q5_K"
    elif role == "attn_output":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(preset, default)
    return default


def _fitted(name: str, columns: int) -> Optional[GGMLType]:
    """``name``'s type, or its fallback where the row width does not divide; None: F16."""
    kind = TYPES[name]
    if not kind.fits(columns):
        kind = TYPES.get(FALLBACK.get(name, ""), kind)
    return kind if kind.fits(columns) else None


def tensor_types(preset: str, tensors: list[Tensor], n_layer: int, n_gqa: int, tied: bool
                 ) -> dict[str, Optional[GGMLType]]:
    """The type of each 2-D tensor in a ``preset`` file (None: F16, where no type fits its width)."""
    preset = check_preset(preset)
    default = PRESETS[preset]
    out: dict[str, Optional[GGMLType]] = {}
    for t in tensors:
        layer = _LAYER.match(t.name)
        if t.name == "output.weight" or (tied and t.name == "token_embd.weight"):
            kind = "Q8_0" if default == "Q8_0" or t.columns % TYPES[default].super else "Q6_K"
        elif layer:
            kind = _bumped(preset, default, layer.group(2), int(layer.group(1)), n_layer, n_gqa)
        else:
            kind = default
        out[t.name] = _fitted(kind, t.columns)
    return out


def search_scheme(preset: str, actorder: Optional[str]) -> QuantizationScheme:
    """The lowbit grid nearest the preset's default type (its bits, at most 4 below 8; its block as the group), for
    what searches on one grid per block: AWQ's scale search. The rounding itself lands on each tensor's own type."""
    kind = TYPES[PRESETS[check_preset(preset)]]
    bits = 8 if kind.bits == 8 else min(kind.bits, 4)
    return make_scheme(bits, kind.block, not kind.affine, actorder, "minmax")
