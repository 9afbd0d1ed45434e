"""A Linear layer that keeps its weight on the integer grid and dequantizes it when called."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.schemes.args import QuantizationArgs
from lowbit.schemes.grid import QuantizedWeight, dequantize


class QuantLinear(nn.Module):
    """y = x ŵᵀ + b with ŵ = (q − z)·s rebuilt from int8 ``weight_q`` [out, in] on every call."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        args: QuantizationArgs,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.args = in_features, out_features, args
        n_groups = in_features // args.group_size_for(in_features)
        self.register_buffer("weight_q", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, n_groups, dtype=dtype, device=device))
        zp_dtype = getattr(torch, args.zp_dtype) if args.zp_dtype else torch.int8
        zp = None if args.symmetric else torch.empty(out_features, n_groups, dtype=zp_dtype, device=device)
        self.register_buffer("weight_zero_point", zp)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> "QuantLinear":
        out_features, in_features = qw.shape
        layer = cls(in_features, out_features, qw.args, bias is not None, qw.scale.dtype, device="meta")
        layer.weight_q = qw.q
        layer.weight_scale = qw.scale
        layer.weight_zero_point = qw.zero_point
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.weight_q, self.weight_scale, self.weight_zero_point, self.args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize(self.quantized_weight(), x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.args.describe()}"
