"""Quantize a full-precision checkpoint's linears at load time (serving engines' ``--quantization``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.nn as nn

from lowbit.runtime.kernels import fast_linear
from lowbit.schemes.args import FP8_PER_TENSOR, QuantizationArgs, make_scheme
from lowbit.schemes.grid import QuantizedWeight, quantize, resolve_group_size

QUANTIZE_ROWS = 4096  # rows rounded at a time: every row has its own scales, and the temporaries stay small

# Load-time quantization is plain min-max RTN: it must take seconds, not minutes. "fp8" is serving engines'
# dynamic FP8 W8A8: a per-tensor weight scale, and each call's input quantized with a scale of its own.
ON_THE_FLY = {
    "int8": make_scheme(8, None, actorder=None, observer="minmax").weights,
    "int4": make_scheme(4, 64, symmetric=False, actorder=None, observer="minmax").weights,
    "fp8": FP8_PER_TENSOR,
}
ON_THE_FLY_INPUTS = {"fp8": replace(FP8_PER_TENSOR, dynamic=True)}


def quantizer_for(name: str) -> Callable[[torch.Tensor, Optional[torch.Tensor], torch.dtype], nn.Module]:
    """A function (weight [N, K], bias, dtype) → fast module holding the weight in ``name``'s format (RTN)."""
    args: QuantizationArgs = ON_THE_FLY[name]
    inputs = ON_THE_FLY_INPUTS.get(name)

    def make(weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> nn.Module:
        qw = quantize(weight.float(), args, torch.float32) if args.strategy == "tensor" else _round_by_rows(
            weight, resolve_group_size(args, weight.shape[1]))
        return fast_linear(qw, bias=bias, dtype=dtype, inputs=None if inputs is None else (inputs, None))

    return make


def _round_by_rows(weight: torch.Tensor, args: QuantizationArgs) -> QuantizedWeight:
    """RTN of ``weight`` [N, K], :data:`QUANTIZE_ROWS` rows at a time, written into tensors allocated once
    (a 262k-row head would otherwise hold its int8 copy twice while the pieces are joined)."""
    out: Optional[QuantizedWeight] = None
    for start in range(0, weight.shape[0], QUANTIZE_ROWS):
        part = quantize(weight[start : start + QUANTIZE_ROWS].float(), args, torch.float32)
        if out is None:
            full = lambda t: None if t is None else t.new_empty((weight.shape[0], *t.shape[1:]))  # noqa: E731
            out = QuantizedWeight(full(part.q), full(part.scale), full(part.zero_point), args)
        rows = slice(start, start + part.q.shape[0])
        out.q[rows], out.scale[rows] = part.q, part.scale
        if part.zero_point is not None:
            out.zero_point[rows] = part.zero_point
    return out
