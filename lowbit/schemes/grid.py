"""Pure quantize/dequantize functions onto the integer grid of a :class:`QuantizationArgs`.

Convention (the one compressed-tensors stores): signed integers ``q`` in ``[q_min, q_max]``,
a float ``scale`` and an integer ``zero_point`` per group, and

    w ≈ ŵ = (q - zero_point) · scale            q = clamp(round(w / scale) + zero_point)

Symmetric grids have ``zero_point = 0`` and ``scale = max|w| / ((q_max - q_min) / 2)``;
asymmetric grids stretch ``[min(w, 0), max(w, 0)]`` over all ``2^b`` levels. FP8 E4M3 grids store
``q = e4m3(w / scale)`` (float8_e4m3fn) with ``scale = max|w| / 448``. Code-book grids
(NF4, FP4; see :mod:`lowbit.schemes.codebooks`) store a 4-bit code per weight and
ŵ = level[q + 8] · scale with ``scale = max|w| / max|level|``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lowbit.schemes.activations import FP8_MAX
from lowbit.schemes.args import MIN_GROUP_SIZE, QuantizationArgs
from lowbit.schemes.codebooks import decode, levels, max_level, nearest_code


@dataclass
class QuantizedWeight:
    """A weight on a grid: ``q`` int8 [out, in] (float8_e4m3fn on an FP8 grid), ``scale`` [out, groups], ``zero_point`` [out, groups] or None
    (int8, or floating point when ``args.zp_dtype`` is set)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    args: QuantizationArgs

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def group_size(self) -> int:
        return self.args.group_size_for(self.q.shape[1])

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize(self, dtype)


MSE_SHRINK = torch.linspace(1.0, 0.8, 21)
MSE_NORM = 2.4


def code_dtype(args: QuantizationArgs) -> torch.dtype:
    """How ``q`` is stored: int8 codes, or float8_e4m3fn values on an FP8 grid."""
    return torch.float8_e4m3fn if args.is_fp8 else torch.int8


def _range_qparams(w_min: torch.Tensor, w_max: torch.Tensor, args: QuantizationArgs, dtype: torch.dtype):
    """Scale and zero point stretching [w_min, w_max] (per row) over the grid; symmetric uses max |w|."""
    steps = max_level(args.type) if args.is_codebook else FP8_MAX if args.is_fp8 else (args.q_max - args.q_min) / 2
    if args.symmetric:
        scale = (torch.maximum(-w_min, w_max) / steps).to(dtype).float()
        return torch.where(scale > 0, scale, torch.ones_like(scale)).to(dtype), None
    scale = ((w_max - w_min) / (2 * steps)).to(dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(args.q_min - w_min / scale), args.q_min, args.q_max)
    return scale.to(dtype), zero_point.to(torch.int8)


def fit_qparams(w: torch.Tensor, args: QuantizationArgs, dtype: Optional[torch.dtype] = None):
    """Scale and zero point of each row of ``w`` [rows, cols] → (scale [rows], zero_point [rows] | None).

    ``observer="minmax"`` maps the row's range onto the grid. ``observer="mse"`` also tries ranges
    shrunk by up to 20% and keeps, per row, the one minimising Σ |w − ŵ|^2.4 (clipping a few
    outliers buys a finer step for the rest). ``dtype`` is the storage dtype of the scale (``args.scale_dtype``
    when set: a GGUF target's float16); rounding uses the stored value so that what is saved reproduces exactly
    what was computed.
    """
    dtype = getattr(torch, args.scale_dtype) if args.scale_dtype else dtype or w.dtype
    if args.strategy == "tensor":  # one scale for the whole weight, repeated per row
        scale, zero = fit_qparams(w.reshape(1, -1), args.with_group_size(None), dtype)
        return scale.expand(w.shape[0]).clone(), None if zero is None else zero.expand(w.shape[0]).clone()
    w = w.float()
    w_min, w_max = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    if args.observer != "mse":
        return _range_qparams(w_min, w_max, args, dtype)
    best_err = torch.full((w.shape[0],), float("inf"))
    best_scale, best_zero = None, None
    for shrink in MSE_SHRINK:
        scale, zero = _range_qparams(w_min * shrink, w_max * shrink, args, dtype)
        w_hat = dequantize_with(quantize_with(w, scale, zero, args), scale, zero, args=args)
        err = (w_hat - w).abs().pow(MSE_NORM).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = scale if best_scale is None else torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = zero if best_zero is None else torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_with(
    w: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], args: QuantizationArgs
) -> torch.Tensor:
    """Round ``w`` [rows, cols] onto the grid given per-row ``scale``/``zero_point`` [rows] → int8 q [rows, cols]."""
    if args.is_codebook:
        return nearest_code(w.float() / scale.float()[:, None], levels(args.type))
    if args.is_fp8:
        return (w.float() / scale.float()[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    z = 0.0 if zero_point is None else zero_point.float()[:, None]
    q = torch.round(w.float() / scale.float()[:, None] + z)
    return q.clamp_(args.q_min, args.q_max).to(torch.int8)


def dequantize_with(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    dtype: torch.dtype = torch.float32,
    args: Optional[QuantizationArgs] = None,
) -> torch.Tensor:
    """ŵ = (q - z) · s (or level[q + 8] · s on a code-book grid) for per-row ``scale``/``zero_point`` [rows]."""
    qf = decode(q, levels(args.type)) if args is not None and args.is_codebook else q.float()
    if zero_point is not None:
        qf = qf - zero_point.float()[:, None]
    return (qf * scale.float()[:, None]).to(dtype)


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View [rows, cols] as [rows · groups, group_size] (``group_size`` divides ``cols``)."""
    rows, cols = w.shape
    return w.reshape(rows * (cols // group_size), group_size)


def quantize(w: torch.Tensor, args: QuantizationArgs, dtype: Optional[torch.dtype] = None) -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D weight [out, in] with min-max group scales."""
    rows, cols = w.shape
    g = args.group_size_for(cols)
    if cols % g:
        raise ValueError(f"group size {g} does not divide {cols} columns; resolve the group size per layer first")
    wg = _groups(w, g)
    scale, zero_point = fit_qparams(wg, args, dtype)
    q = quantize_with(wg, scale, zero_point, args).reshape(rows, cols)
    n = cols // g
    return QuantizedWeight(
        q=q,
        scale=scale.reshape(rows, n),
        zero_point=None if zero_point is None else zero_point.reshape(rows, n),
        args=args,
    )


def dequantize(qw: QuantizedWeight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """ŵ = (q - z) · s with each group's scale broadcast over its ``group_size`` columns."""
    dtype = dtype or qw.scale.dtype
    rows, cols = qw.q.shape
    g = qw.group_size
    z = None if qw.zero_point is None else qw.zero_point.reshape(-1)
    w = dequantize_with(_groups(qw.q, g), qw.scale.reshape(-1), z, dtype, qw.args)
    return w.reshape(rows, cols)


def resolve_group_size(args: QuantizationArgs, in_features: int) -> QuantizationArgs:
    """Arguments that fit a layer of width ``in_features``.

    compressed-tensors (and every consumer of it) requires the group size to divide the input
    width. When it does not, the layer falls back to the largest power-of-two group size below
    the requested one that divides it (per-channel if none does); callers report the change.
    """
    if args.strategy != "group" or in_features % args.group_size == 0:
        return args
    g = 1 << (int(args.group_size).bit_length() - 1)
    while g >= MIN_GROUP_SIZE:
        if in_features % g == 0 and g < args.group_size:
            return args.with_group_size(g)
        g //= 2
    return args.with_group_size(None)


def group_size_fallback(requested: QuantizationArgs, fitted: QuantizationArgs, in_features: int) -> Optional[str]:
    """The notice for a layer whose fitted arguments differ from the requested ones (None: they do not)."""
    if fitted == requested:
        return None
    return f"group size {requested.group_size} does not divide {in_features}: {fitted.describe()}"
