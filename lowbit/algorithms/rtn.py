"""Round-to-nearest: each weight goes to the nearest level of its group's fitted grid."""

from __future__ import annotations

from typing import Union

import torch

from lowbit.schemes import ggml
from lowbit.schemes.args import QuantizationArgs
from lowbit.schemes.ggml import GGMLType, GGMLWeight
from lowbit.schemes.grid import QuantizedWeight, quantize


def rtn_quantize(W: torch.Tensor, H: None, args: Union[QuantizationArgs, GGMLType]
                 ) -> tuple[Union[QuantizedWeight, GGMLWeight], float]:
    """ŵ = quant(w) per group (lowbit's min-max grids, or a llama.cpp type's fitted one); returns the weight on
    the grid and Σ (w − ŵ)²."""
    qw = ggml.quantize(W, args) if isinstance(args, GGMLType) else quantize(W, args)
    return qw, float(((W.float() - qw.dequantize(torch.float32)) ** 2).sum())
