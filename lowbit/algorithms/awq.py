"""AWQ: activation-aware per-channel scaling, then weight clipping, searched per decoder block.

Lin et al. (2023). For each :class:`~lowbit.models.architectures.Smoothing` (an op feeding some
linears), with x̄_j = mean |x_j| the input channels' mean magnitude over the calibration tokens and
w̄_j the mean over output rows of |W_ij| relative to its group's max (AutoAWQ's "duo scaling"):

    s(α) = x̄^α / w̄^(1−α), normalised by √(max s · min s),     α ∈ {0, 1/n, …, (n−1)/n}
    s*   = argmin_{s ∈ {1} ∪ {s(α)}} ‖ M(X; Q(W·diag s)·diag s⁻¹) − M(X; W) ‖²  (M: ``inspect``)

where Q is the rounding that follows: RTN for ``awq``; GPTQ for ``awq+gptq``, given the scaled
inputs' Hessian diag(s)⁻¹ H diag(s)⁻¹ (scales chosen for RTN's error hurt GPTQ at 3 bits: SmolLM2
W3 g64, 32 calibration windows, 60.1 perplexity against 56.0 with the GPTQ-aware search and 56.8
for GPTQ alone; GPTQ per candidate is slower, so that search uses n = 10). s = 1 lets the search
leave an op's channels as they are. Then the balance linears keep W·diag s and the previous op's
output channels are divided by s (a norm's weight, or a Linear's rows and bias), which leaves the
full-precision function unchanged and makes the salient input channels cheaper to quantize. Next,
for every linear (q/k too, which AutoAWQ leaves out: clipping them measured 44.3 against 45.2
perplexity on SmolLM2 W4 g64), each output row and group gets a clipping range:

    m* = argmin_{m = (1 − k/n_c)·max|w_g|}  Σ_tokens ( x_g·(Q(clamp(w_g, ±m)) − w_g) )²

The weights are left transformed in full precision; the rounding runs after: RTN on the clipped
ranges as they are (:func:`awq_round`: min-max; an MSE observer would clip a second time), or GPTQ
(without the clipping, which is tuned for RTN).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Union

import torch
import torch.nn as nn

from lowbit.algorithms.gptq import gptq_quantize
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.algorithms.smoothing import applicable, first_tokens, fold_scales
from lowbit.calibration.statistics import HessianAccumulator, capture_inputs, first_input, observe_inputs
from lowbit.models.architectures import Smoothing
from lowbit.schemes.args import QuantizationArgs
from lowbit.schemes.ggml import GGMLType
from lowbit.schemes.grid import dequantize, quantize, resolve_group_size

N_GRID = 20
N_CLIP = 20
MAX_CLIP_SHRINK = 0.5
CLIP_TOKENS = 512
SEARCH_TOKENS = 4096  # calibration tokens the searches run on (the first batches): ~6 s per SmolLM2 block


def fake_quantize(W: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """Q(W): W on the grid (min-max ranges, as the search needs speed) and back, float32."""
    args = replace(resolve_group_size(args, W.shape[1]), observer="minmax", actorder=None)
    return dequantize(quantize(W.float(), args), torch.float32)


def rtn_rounding(W: torch.Tensor, H: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """Q(W) as AWQ's own RTN rounding sees it (the Hessian is not used)."""
    return fake_quantize(W, args)


def gptq_rounding(W: torch.Tensor, H: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """Q(W) as GPTQ will round it given the inputs' Hessian H, float32."""
    return gptq_quantize(W.float(), H, resolve_group_size(args, W.shape[1]))[0].dequantize(torch.float32)


def _first(y):
    return y[0] if isinstance(y, tuple) else y


def _relative_weight_magnitude(balance: list[nn.Linear], args: QuantizationArgs) -> torch.Tensor:
    """w̄_j: mean over the balance linears' rows of |W_ij| / max |W| of its group (input channel j)."""
    W = torch.cat([layer.weight.data.float() for layer in balance])
    g = args.group_size_for(W.shape[1])
    groups = W.abs().reshape(-1, g)
    relative = groups / (groups.amax(dim=1, keepdim=True) + 1e-6)
    return relative.reshape(W.shape).mean(dim=0)


def _candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, n_grid: int):
    """s = 1 (leave the channels as they are), then s(α) for α on the grid."""
    yield torch.ones_like(x_mean)
    for r in range(n_grid):
        alpha = r / n_grid
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
        yield s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scales(
    inspect: nn.Module, calls: list, balance: list[nn.Linear], args: QuantizationArgs, rounding=rtn_rounding,
    n_grid: int = N_GRID,
) -> torch.Tensor:
    """s* for one smoothing (see the module docstring); ``calls`` are the inspect module's inputs.

    ``rounding(W, H, args)`` is Q: the rounding that will follow, given the balance linears' input
    Hessian H = 2/n Σ x xᵀ; the scaled inputs x/s have H / (s sᵀ).
    """
    hessian = HessianAccumulator(balance[0].in_features)
    x_abs = torch.zeros(balance[0].in_features)

    def observe(_name, a, k):
        x = first_input(a, k)
        x = x.reshape(-1, x.shape[-1]).float()
        x_abs.add_(x.abs().sum(dim=0))
        hessian.add(x)

    with observe_inputs({"balance": balance[0]}, observe):
        reference = [_first(inspect(*a, **k)) for a, k in calls]
    x_mean = x_abs / hessian.n
    w_mean = _relative_weight_magnitude(balance, resolve_group_size(args, balance[0].in_features))
    originals = [layer.weight.data.clone() for layer in balance]
    best_err, best_s = float("inf"), torch.ones_like(x_mean)
    for s in _candidate_scales(x_mean, w_mean, n_grid):
        H = hessian.H / (s[:, None] * s[None, :])
        for layer, W in zip(balance, originals):
            layer.weight.data = (rounding(W.float() * s, H, args) / s).to(W.dtype)
        err = sum(float((_first(inspect(*a, **k)) - ref).float().pow(2).mean()) for (a, k), ref in zip(calls, reference))
        if err < best_err:
            best_err, best_s = err, s
    for layer, W in zip(balance, originals):
        layer.weight.data = W
    return best_s


@torch.no_grad()
def search_clip(W: torch.Tensor, X: torch.Tensor, args: QuantizationArgs, rows_per_chunk: int = 128) -> torch.Tensor:
    """W [out, in] clamped per (row, group) to the range minimising the group outputs' error on X [n, in]."""
    args = resolve_group_size(args, W.shape[1])
    g = args.group_size_for(W.shape[1])
    out_features, in_features = W.shape
    Xg = X.float().reshape(X.shape[0], in_features // g, g)
    clipped = torch.empty_like(W)
    for r0 in range(0, out_features, rows_per_chunk):
        Wc = W[r0 : r0 + rows_per_chunk].float()
        Wg = Wc.reshape(Wc.shape[0], -1, g)
        reference = torch.einsum("ngk,ogk->nog", Xg, Wg)
        max_abs = Wg.abs().amax(dim=-1, keepdim=True)
        best_err = torch.full(max_abs.shape[:2], float("inf"))
        best_max = max_abs.clone()
        for k in range(int(N_CLIP * MAX_CLIP_SHRINK)):
            m = max_abs * (1 - k / N_CLIP)
            Q = fake_quantize(torch.maximum(torch.minimum(Wg, m), -m).reshape_as(Wc), args).reshape_as(Wg)
            err = (torch.einsum("ngk,ogk->nog", Xg, Q) - reference).pow(2).mean(dim=0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better[..., None], m, best_max)
        clipped[r0 : r0 + rows_per_chunk] = torch.maximum(torch.minimum(Wg, best_max), -best_max).reshape_as(Wc)
    return clipped.to(W.dtype)


def awq_round(W: torch.Tensor, H: None, args: Union[QuantizationArgs, GGMLType]):
    """RTN with min-max ranges: after the clipping search, the range of each group is the chosen one (a llama.cpp
    type fits its own).

    Measured on SmolLM2 W4 g64 (16k held-out tokens): 45.5 perplexity, against 48.9 when the MSE
    observer shrinks the clipped ranges again (RTN alone: 49.3).
    """
    return rtn_quantize(W, H, args if isinstance(args, GGMLType) else replace(args, observer="minmax"))


@torch.no_grad()
def awq_transform_block(
    block: nn.Module, calls: list, args: QuantizationArgs, smoothings: tuple[Smoothing, ...], norm_offset: float = 0.0,
    clip: bool = True, rounding=rtn_rounding, n_grid: int = N_GRID,
) -> None:
    """Smooth then (``clip``) clip the block's linears in place (full precision); ``calls`` are the
    block's (hidden states, keyword arguments) per calibration batch; ``rounding``: the rounding the
    scale search assumes (see :func:`search_scales`). See the module docstring."""
    batches = first_tokens(calls, SEARCH_TOKENS)
    found = applicable(block, smoothings)
    seen_inspect = capture_inputs(block, batches, {sm.inspect: block.get_submodule(sm.inspect) for sm, _, _ in found})
    for sm, previous, balance in found:
        s = search_scales(block.get_submodule(sm.inspect), seen_inspect[sm.inspect], balance, args, rounding, n_grid)
        fold_scales(previous, balance, s, norm_offset)
    if not clip:
        return
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    seen = capture_inputs(block, batches, linears, rows=max(1, CLIP_TOKENS // len(batches)))
    for name, layer in linears.items():
        layer.weight.data = search_clip(layer.weight.data, torch.cat(seen[name]), args)
