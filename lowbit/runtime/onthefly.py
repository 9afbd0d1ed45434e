"""Quantize a full-precision checkpoint's linears at load time (serving engines' ``--quantization``)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from lowbit.runtime.kernels import Fp8Linear, fast_linear
from lowbit.schemes.args import QuantizationArgs, make_scheme
from lowbit.schemes.grid import quantize, resolve_group_size

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
        qw = quantize(weight.float(), resolve_group_size(args, weight.shape[1]), torch.float32)
        return fast_linear(qw, bias=bias, dtype=dtype)

    return make
