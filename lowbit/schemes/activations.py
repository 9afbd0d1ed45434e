"""Quantized activations (a linear's input x [T, K]): the pure functions evaluation and the runtime share.

    int8:      x̂ = s · clamp(round(x / s), −127, 127)
    FP8 E4M3:  x̂ = s · e4m3(clamp(x / s, −448, 448))

with s = max |x| / Q taken per token (``strategy="token"``: s_t = max_j |x_tj| / Q, one scale per row,
always dynamic) or per tensor (``strategy="tensor"``: dynamic over the call, or static, a calibrated
``input_scale``); Q = 127 for int8, 448 for E4M3. Activations are symmetric.

The int8 range is [−127, 127], as vLLM's dynamic int8 quantization computes it, not [−128, 127]: an
AVX2 kernel multiplies u8 × s8 pairs into int16 (``maddubs``), which stays clear of saturation only
when the activation side has |q| ≤ 127.
"""

from __future__ import annotations

from typing import Optional

import torch

from lowbit.errors import LowbitError
from lowbit.schemes.args import QuantizationArgs

INT8_MAX = 127
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
MIN_SCALE = 1e-12  # an all-zero row keeps a finite scale (and quantizes to zeros)


def check_activation_args(args: QuantizationArgs) -> QuantizationArgs:
    """``args`` if activations can be quantized that way, else a one-line :class:`LowbitError`."""
    if args.num_bits != 8 or args.type not in ("int", "float"):
        raise LowbitError("activations are quantized to int8 or FP8 E4M3 (num_bits 8, type int or float)")
    if not args.symmetric:
        raise LowbitError("activations are quantized symmetrically (symmetric: true)")
    if args.strategy not in ("token", "tensor"):
        raise LowbitError(f"activation strategy is 'token' or 'tensor', not {args.strategy!r}")
    if args.strategy == "token" and not args.dynamic:
        raise LowbitError("per-token activation scales are dynamic: a calibrated scale is per tensor")
    return args


def q_max(args: QuantizationArgs) -> float:
    return FP8_MAX if args.is_fp8 else float(INT8_MAX)


def activation_scale(x: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """Dynamic s of x [T, K], float32: [T, 1] per token, [1, 1] per tensor."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    if args.strategy == "tensor":
        amax = amax.amax().reshape(1, 1)
    return (amax / q_max(args)).clamp(min=MIN_SCALE)


def quantize_activation(
    x: torch.Tensor, args: QuantizationArgs, scale: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) of x [T, K]: q int8 or float8_e4m3fn [T, K]; s the static ``scale`` or the dynamic one."""
    s = activation_scale(x, args) if scale is None else scale.float().reshape(-1, 1)
    y = x.float() / s
    if args.is_fp8:
        return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s
    return y.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), s


def fake_quantize_activation(
    x: torch.Tensor, args: QuantizationArgs, scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """x̂ = s · q in x's dtype and shape (any leading dimensions): what the int8/FP8 matmul sees."""
    flat = x.reshape(-1, x.shape[-1])
    q, s = quantize_activation(flat, args, scale)
    return (q.float() * s).to(x.dtype).reshape(x.shape)


def static_scale(amax: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """The per-tensor ``input_scale`` [1] from the calibration tokens' max |x|."""
    return (amax.float().reshape(1) / q_max(args)).clamp(min=MIN_SCALE)
