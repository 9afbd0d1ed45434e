"""SmoothQuant: move the activations' outlier channels into the weights before W8A8 quantization.

Xiao et al. (2023). For a smoothing (an op whose output channel j feeds input column j of the balance
linears), with X the balance linears' calibration inputs and W their weights stacked by rows:

    s_j(α) = max|X_j|^α / max|W_:j|^(1−α)          X' = X diag(s)⁻¹,   W' = W diag(s)

folded into the op (:func:`lowbit.algorithms.smoothing.fold_scales`), so the full-precision function
is unchanged; the paper's default is α = 0.5.

``alpha="auto"`` tunes α per smoothing, as Neural Compressor does per layer: each candidate of
:data:`ALPHAS` (0.0 to 1.0 by 0.1, Neural Compressor 3.x's grid; its older AutoAlpha searched 0.3–0.7,
which the wider grid contains), and s = 1 (no smoothing), is judged by the error of the ``inspect``
module's output (the attention or MLP the linears belong to) with every balance linear fake-quantized,
weights int8 per channel and inputs int8 per tensor, against full precision:

    α* = argmin ‖ M(X; Q_w(W diag s), Q_x(X diag s⁻¹)) − M(X; W, X) ‖²

Per-tensor input scales are stricter than the per-token ones W8A8 runs with; an α that serves them
serves per-token too. For a norm feeding several linears (q, k, v) the criterion is shared: the output
of the module they feed, where their errors meet, rather than a mean/min/max of per-linear errors.
Because s = 1 and α = 0.5 are candidates, each smoothing's error under auto is at most theirs.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from lowbit.algorithms.awq import SEARCH_TOKENS, fake_quantize
from lowbit.algorithms.smoothing import applicable, first_tokens, fold_scales
from lowbit.calibration.statistics import capture_inputs, first_input, observe_inputs
from lowbit.models.architectures import Smoothing
from lowbit.schemes.activations import fake_quantize_activation
from lowbit.schemes.args import QuantizationArgs

ALPHAS = tuple(i / 10 for i in range(11))
MIN_MAGNITUDE = 1e-5  # Neural Compressor's floor for max |X_j| and max |W_:j|
SEARCH_WEIGHTS = QuantizationArgs(num_bits=8, strategy="channel", group_size=None, observer="minmax")
SEARCH_INPUTS = QuantizationArgs(num_bits=8, strategy="tensor", group_size=None, dynamic=True)

Alpha = Union[float, str]


def smoothing_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s(α) [K] from the channels' max |X_j| and max |W_:j| (each floored at :data:`MIN_MAGNITUDE`)."""
    s = x_max.float().clamp(min=MIN_MAGNITUDE).pow(alpha) / w_max.float().clamp(min=MIN_MAGNITUDE).pow(1 - alpha)
    return s.clamp(min=MIN_MAGNITUDE)


def weight_max(balance: list[nn.Linear]) -> torch.Tensor:
    """max |W_:j| over the rows of all balance linears, per input column j."""
    return torch.stack([layer.weight.detach().abs().amax(dim=0).float() for layer in balance]).amax(dim=0)


def _first(y):
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def output_error(inspect: nn.Module, calls: list, reference: list, balance: list[nn.Linear], s: torch.Tensor) -> float:
    """Mean squared error of ``inspect``'s output when the balance linears run smoothed by s and fake-quantized
    (weights :data:`SEARCH_WEIGHTS`, inputs :data:`SEARCH_INPUTS`), against ``reference``."""
    originals = [layer.weight.data for layer in balance]
    quantized_input = lambda _m, args: (fake_quantize_activation(args[0] / s.to(args[0].dtype), SEARCH_INPUTS),)  # noqa: E731
    handles = [layer.register_forward_pre_hook(quantized_input) for layer in balance]
    try:
        for layer, W in zip(balance, originals):
            layer.weight.data = fake_quantize(W.float() * s, SEARCH_WEIGHTS).to(W.dtype)
        return sum(float((_first(inspect(*a, **k)) - ref).float().pow(2).mean()) for (a, k), ref in zip(calls, reference))
    finally:
        for h in handles:
            h.remove()
        for layer, W in zip(balance, originals):
            layer.weight.data = W


def search_alpha(inspect: nn.Module, calls: list, balance: list[nn.Linear], x_max: torch.Tensor) -> Optional[float]:
    """α* of one smoothing (None: s = 1 is best); ``calls``: the inspect module's (args, kwargs)."""
    with torch.no_grad():
        reference = [_first(inspect(*a, **k)) for a, k in calls]
    w_max = weight_max(balance)
    best_alpha, best_err = None, output_error(inspect, calls, reference, balance, torch.ones_like(x_max))
    for alpha in ALPHAS:
        err = output_error(inspect, calls, reference, balance, smoothing_scales(x_max, w_max, alpha))
        if err < best_err:
            best_alpha, best_err = alpha, err
    return best_alpha


def input_channel_max(block: nn.Module, calls: list, linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """max |X_j| of each named linear's input over the block's ``calls``."""
    amax = {name: torch.zeros(layer.in_features) for name, layer in linears.items()}

    def observe(name, a, k):
        x = first_input(a, k)
        torch.maximum(amax[name], x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float(), out=amax[name])

    with observe_inputs(linears, observe), torch.no_grad():
        for x, kw in calls:
            block(x, **kw)
    return amax


@torch.no_grad()
def smoothquant_transform_block(
    block: nn.Module, calls: list, smoothings: tuple[Smoothing, ...], alpha: Alpha, norm_offset: float = 0.0,
) -> dict[str, Optional[float]]:
    """Smooth ``block`` in place (full precision); ``calls``: its (hidden states, kwargs) per calibration
    batch. Returns the α each smoothing got, by its previous op's name (None: left unsmoothed)."""
    batches = first_tokens(calls, SEARCH_TOKENS)
    found = applicable(block, smoothings)
    x_max = input_channel_max(block, batches, {sm.previous: balance[0] for sm, _, balance in found})
    inspected = {}
    if alpha == "auto":
        inspected = capture_inputs(block, batches, {sm.inspect: block.get_submodule(sm.inspect) for sm, _, _ in found})
    chosen: dict[str, Optional[float]] = {}
    for sm, previous, balance in found:
        a = search_alpha(block.get_submodule(sm.inspect), inspected[sm.inspect], balance, x_max[sm.previous]) \
            if alpha == "auto" else float(alpha)
        chosen[sm.previous] = a
        if a is not None:
            fold_scales(previous, balance, smoothing_scales(x_max[sm.previous], weight_max(balance), a), norm_offset)
    return chosen
