"""Ternary weights {−1, 0, +1}·scale, BitNet b1.58's absmean rule applied after training.

Per group (or per output channel):  γ = mean |W|,   q = clamp(round(W / γ), −1, 1),   ŵ = q·γ.

The codes are stored on the symmetric 2-bit grid (levels −2 … 1; −2 is never used), so a
ternary checkpoint is an ordinary 2-bit pack-quantized one: 2 bits per weight plus the scales.
BitNet trains with this quantizer in the loop; applied to a model trained in full precision it
destroys most of its accuracy (see bench/methods.py), which is why it is an option, not a default.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lowbit.schemes.args import QuantizationArgs
from lowbit.schemes.grid import QuantizedWeight


def ternary_quantize(W: torch.Tensor, H: None, args: QuantizationArgs) -> tuple[QuantizedWeight, float]:
    """Absmean ternary quantization of W [out, in] (``args`` gives the group size; the grid is 2-bit symmetric)."""
    args = replace(args, num_bits=2, symmetric=True, type="int", zp_dtype=None)
    rows, cols = W.shape
    g = args.group_size_for(cols)
    Wg = W.float().reshape(rows * (cols // g), g)
    gamma = Wg.abs().mean(dim=1).clamp(min=1e-8).to(W.dtype)
    q = torch.clamp(torch.round(Wg / gamma.float()[:, None]), -1, 1)
    loss = float(((Wg - q * gamma.float()[:, None]) ** 2).sum())
    n = cols // g
    return QuantizedWeight(q.to(torch.int8).reshape(rows, cols), gamma.reshape(rows, n), None, args), loss
