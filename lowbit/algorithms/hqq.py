"""HQQ-style data-free quantization: fit each group's scale and zero point by half-quadratic splitting.

Half-Quadratic Quantization (Badri & Shaji, 2023) minimises a sparsity-promoting error instead of
the squared one, so that a few outliers do not dictate the grid:

    min_{s, z}  ‖W − ŵ(s, z)‖_p^p,   p < 1,     ŵ = (q − z)·s,  q = clamp(round(W/s) + z)

Splitting the error into an auxiliary W_e and alternating closed-form steps, for k = 1 … iters:

    W_e ← shrink_p(W − ŵ, β)      = sign(x)·max(|x| − |x|^{p−1}/β, 0)    (the outliers' part)
    s   ← ⟨W − W_e, q − z⟩ / ‖q − z‖²                                    (least squares on the rest)
    z   ← mean(q − (W − W_e)/s)               (asymmetric grids: a float zero point, as in HQQ)
    β   ← κ·β

per group, keeping the iterate with the lowest ‖W − ŵ‖_p. Zero points are fitted floats (stored
with compressed-tensors' ``zp_dtype``); on SmolLM2 W4 g64 asymmetric this measured 43.7
perplexity against RTN's 45.8 (16k held-out tokens). Symmetric grids and code books have no zero
point, so only the scale moves there, which measured no better than RTN with the MSE observer.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lowbit.schemes.args import QuantizationArgs
from lowbit.schemes.grid import QuantizedWeight, dequantize_with, fit_qparams, quantize_with

P_NORM = 0.7
BETA = 10.0
KAPPA = 1.01
ITERS = 20


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of |x|^p / β (the generalised soft threshold)."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp(min=1e-8).pow(p - 1) / beta)


def _lp_error(W: torch.Tensor, W_hat: torch.Tensor, p: float) -> torch.Tensor:
    return (W - W_hat).abs().pow(p).sum(dim=1)


def hqq_groups(W: torch.Tensor, args: QuantizationArgs, dtype: torch.dtype, iters: int = ITERS):
    """Fit (scale, zero_point) of each row of ``W`` [groups, group_size]."""
    s, z = fit_qparams(W, args, dtype)
    s = s.float()
    z = None if z is None else z.float()
    best_s, best_z = s.clone(), z
    q = quantize_with(W, s, z, args)
    best_err = _lp_error(W, dequantize_with(q, s, z, args=args), P_NORM)
    beta = BETA
    for _ in range(iters):
        W_e = _shrink(W - dequantize_with(q, s, z, args=args), beta, P_NORM)
        target = W - W_e
        level = dequantize_with(q, torch.ones_like(s), z, args=args)  # q − z (or the code-book level)
        denom = (level * level).sum(dim=1)
        s = torch.where(denom > 0, (target * level).sum(dim=1) / denom.clamp(min=1e-12), s).abs()
        s = torch.where(s > 0, s, best_s.float()).to(dtype).float()
        if z is not None:
            z = (q.float() - target / s[:, None]).mean(dim=1).clamp(args.q_min, args.q_max).to(dtype).float()
        q = quantize_with(W, s, z, args)
        err = _lp_error(W, dequantize_with(q, s, z, args=args), P_NORM)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
        beta *= KAPPA
    return best_s.to(dtype), None if best_z is None else best_z.to(dtype)


def hqq_quantize(W: torch.Tensor, H: None, args: QuantizationArgs) -> tuple[QuantizedWeight, float]:
    """Quantize W [out, in] with HQQ-fitted group parameters; returns the weight and Σ (w − ŵ)²."""
    if not args.symmetric:
        args = replace(args, zp_dtype=str(W.dtype).removeprefix("torch."))
    rows, cols = W.shape
    g = args.group_size_for(cols)
    Wg = W.float().reshape(rows * (cols // g), g)
    scale, zero = hqq_groups(Wg, args, W.dtype)
    q = quantize_with(Wg, scale, zero, args)
    loss = float(((Wg - dequantize_with(q, scale, zero, args=args)) ** 2).sum())
    n = cols // g
    qw = QuantizedWeight(q.reshape(rows, cols), scale.reshape(rows, n), None if zero is None else zero.reshape(rows, n), args)
    return qw, loss
