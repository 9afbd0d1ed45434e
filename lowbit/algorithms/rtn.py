"""Round-to-nearest: each weight goes to the nearest level of its group's min-max grid."""

from __future__ import annotations

import torch

from lowbit.schemes.args import QuantizationArgs
from lowbit.schemes.grid import QuantizedWeight, quantize


def rtn_quantize(W: torch.Tensor, H: None, args: QuantizationArgs) -> tuple[QuantizedWeight, float]:
    """ŵ = quant(w) per group; returns the weight on the grid and Σ (w − ŵ)²."""
    qw = quantize(W, args)
    return qw, float(((W.float() - qw.dequantize(torch.float32)) ** 2).sum())
