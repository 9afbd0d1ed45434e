"""A Linear layer that keeps its weight on the integer grid and dequantizes it when called; with an
activation scheme its input is quantized first, exactly as the int8/FP8 matmul would see it. A weight on one of
llama.cpp's grids (the GGUF path) gets a :class:`GGMLLinear`."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.schemes.activations import fake_quantize_activation
from lowbit.schemes.args import QuantizationArgs
from lowbit.schemes.ggml import GGMLWeight
from lowbit.schemes.grid import QuantizedWeight, code_dtype, dequantize


def _register_grid_buffers(module: nn.Module, rows: int, cols: int, args: QuantizationArgs, dtype, device) -> None:
    """Empty ``weight_q`` [rows, cols] (int8, or float8 on an FP8 grid), ``weight_scale`` and ``weight_zero_point`` [rows, groups] buffers."""
    n_groups = cols // args.group_size_for(cols)
    module.register_buffer("weight_q", torch.empty(rows, cols, dtype=code_dtype(args), device=device))
    module.register_buffer("weight_scale", torch.empty(rows, n_groups, dtype=dtype, device=device))
    zp_dtype = getattr(torch, args.zp_dtype) if args.zp_dtype else torch.int8
    zp = None if args.symmetric else torch.empty(rows, n_groups, dtype=zp_dtype, device=device)
    module.register_buffer("weight_zero_point", zp)


class QuantLinear(nn.Module):
    """y = x̂ ŵᵀ + b with ŵ = (q − z)·s rebuilt from int8 ``weight_q`` [out, in] on every call, and x̂ = x
    or, with ``input_args``, x quantized per token or per tensor (static: the calibrated ``input_scale``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        args: QuantizationArgs,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
        input_args: Optional[QuantizationArgs] = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.args, self.input_args = in_features, out_features, args, input_args
        _register_grid_buffers(self, out_features, in_features, args, dtype, device)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        static = input_args is not None and not input_args.dynamic
        self.register_buffer("input_scale", torch.empty(1, dtype=dtype, device=device) if static else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                       input_args: Optional[QuantizationArgs] = None,
                       input_scale: Optional[torch.Tensor] = None) -> "QuantLinear":
        out_features, in_features = qw.shape
        layer = cls(in_features, out_features, qw.args, bias is not None, qw.scale.dtype, device="meta",
                    input_args=input_args)
        layer.weight_q = qw.q
        layer.weight_scale = qw.scale
        layer.weight_zero_point = qw.zero_point
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        if layer.input_scale is not None:
            layer.input_scale = input_scale.detach().reshape(1).to(qw.scale.dtype).clone()
        return layer

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.weight_q, self.weight_scale, self.weight_zero_point, self.args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_args is not None:
            x = fake_quantize_activation(x, self.input_args, self.input_scale)
        w = dequantize(self.quantized_weight(), x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        acts = "" if self.input_args is None else f", input {self.input_args.describe()}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.args.describe()}{acts}"


class QuantEmbedding(nn.Module):
    """An embedding table [vocab, dim] kept on the grid; rows are dequantized when looked up.

    Rows play the part of a Linear's output channels (scales per row, groups along ``dim``), so a
    tied output projection can be a :class:`QuantLinear` over the very same tensors.
    ``embed_scale`` keeps the factor some families apply to embeddings (Gemma: √dim).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, args: QuantizationArgs, dtype=torch.float32,
                 device=None, embed_scale: Optional[torch.Tensor] = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.args = num_embeddings, embedding_dim, args
        _register_grid_buffers(self, num_embeddings, embedding_dim, args, dtype, device)
        self.register_buffer("embed_scale", None if embed_scale is None else embed_scale.detach().clone(), persistent=False)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, embed_scale: Optional[torch.Tensor] = None) -> "QuantEmbedding":
        vocab, dim = qw.shape
        layer = cls(vocab, dim, qw.args, qw.scale.dtype, device="meta", embed_scale=embed_scale)
        layer.weight_q, layer.weight_scale, layer.weight_zero_point = qw.q, qw.scale, qw.zero_point
        if embed_scale is not None:
            layer.embed_scale = embed_scale.detach().clone()
        return layer

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.weight_q, self.weight_scale, self.weight_zero_point, self.args)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        zp = None if self.weight_zero_point is None else self.weight_zero_point[ids]
        rows = QuantizedWeight(self.weight_q[ids].reshape(-1, self.embedding_dim),
                               self.weight_scale[ids].reshape(ids.numel(), -1),
                               None if zp is None else zp.reshape(ids.numel(), -1), self.args)
        out = dequantize(rows, self.weight_scale.dtype).reshape(*ids.shape, self.embedding_dim)
        return out if self.embed_scale is None else out * self.embed_scale.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.args.describe()}"


class GGMLLinear(nn.Module):
    """y = x ŵᵀ + b with ŵ rebuilt from a :class:`GGMLWeight` (codes, block scales) on every call: the linears of
    a model quantized for a GGUF file, which the GGUF writer encodes as they are."""

    def __init__(self, qw: GGMLWeight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.args = qw.kind
        for field in ("c", "d", "sc", "dmin", "m"):
            self.register_buffer(f"weight_{field}", getattr(qw, field))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def quantized_weight(self) -> GGMLWeight:
        return GGMLWeight(self.weight_c, self.weight_d, self.weight_sc, self.weight_dmin, self.weight_m, self.args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight().dequantize(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.args.describe()}"


def quantized_linear(qw, bias: Optional[torch.Tensor] = None, input_args: Optional[QuantizationArgs] = None,
                     input_scale: Optional[torch.Tensor] = None) -> nn.Module:
    """The module for a rounded weight: :class:`QuantLinear` on a lowbit grid, :class:`GGMLLinear` on a ggml one."""
    if isinstance(qw, GGMLWeight):
        return GGMLLinear(qw, bias)
    return QuantLinear.from_quantized(qw, bias, input_args, input_scale)


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``root.get_submodule(name)`` is (the one module swap every stage uses)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
