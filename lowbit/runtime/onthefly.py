"""Quantize a full-precision checkpoint's linears at load time (serving engines' ``--quantization``)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from lowbit.runtime.kernels import Fp8Linear, fast_linear
from lowbit.schemes.args import QuantizationArgs, make_scheme
from lowbit.schemes.grid import QuantizedWeight, quantize, resolve_group_size

QUANTIZE_ROWS = 4096  # rows rounded at a time: every row has its own scales, and the temporaries stay small

# Load-time quantization is plain min-max RTN: it must take seconds, not minutes.
ON_THE_FLY = {
    "int8": make_scheme(8, None, actorder=None, observer="minmax").weights,
    "int4": make_scheme(4, 64, symmetric=False, actorder=None, observer="minmax").weights,
    "fp8": None,
}


def quantizer_for(name: str) -> Callable[[torch.Tensor, Optional[torch.Tensor], torch.dtype], nn.Module]:
    """A function (weight [N, K], bias, dtype) → fast module holding the weight in ``name``'s format (RTN)."""
    args: Optional[QuantizationArgs] = ON_THE_FLY[name]

    def make(weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> nn.Module:
        if args is None:
            return Fp8Linear(weight, bias, dtype)
        rows_args = resolve_group_size(args, weight.shape[1])
        parts = [quantize(rows.float(), rows_args, torch.float32) for rows in weight.split(QUANTIZE_ROWS)]
        zero_point = None if parts[0].zero_point is None else torch.cat([p.zero_point for p in parts])
        qw = QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), zero_point, rows_args)
        return fast_linear(qw, bias=bias, dtype=dtype)

    return make
