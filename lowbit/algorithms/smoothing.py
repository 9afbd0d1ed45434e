"""Per-channel scales moved between an op and the linears it feeds: the step AWQ and SmoothQuant share.

For a :class:`~lowbit.models.architectures.Smoothing` and scales s over the op's output channels,

    previous: y_j ← y_j / s_j (a norm's (offset + weight), or a Linear's rows and bias)
    balance:  W_:j ← W_:j · s_j

leaves the full-precision function unchanged; what changes is which side carries each channel's range.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lowbit.models.architectures import Smoothing


def applicable(block: nn.Module, smoothings: tuple[Smoothing, ...]) -> list[tuple[Smoothing, nn.Module, list[nn.Linear]]]:
    """(smoothing, previous, balance linears) of each smoothing whose widths agree in ``block``
    (v → o does not apply under grouped-query attention)."""
    found = []
    for sm in smoothings:
        previous = block.get_submodule(sm.previous)
        balance = [block.get_submodule(name) for name in sm.balance]
        width = previous.out_features if isinstance(previous, nn.Linear) else previous.weight.shape[0]
        if all(layer.in_features == width for layer in balance):
            found.append((sm, previous, balance))
    return found


def first_tokens(calls: list, tokens: int) -> list:
    """The first calibration calls (hidden states [b, t, d], kwargs) until they hold ``tokens`` tokens: what a
    scale search runs on."""
    batches, seen = [], 0
    for x, kw in calls:
        if seen >= tokens:
            break
        batches.append((x, kw))
        seen += x.shape[0] * x.shape[1]
    return batches


def fold_scales(previous: nn.Module, balance: list[nn.Linear], s: torch.Tensor, norm_offset: float) -> None:
    """Divide ``previous``'s output channels by s and multiply the balance linears' input columns by s."""
    if isinstance(previous, nn.Linear):
        previous.weight.data.div_(s[:, None].to(previous.weight.dtype))
    else:
        w = previous.weight.data
        w.copy_((w.float() + norm_offset) / s - norm_offset)
    bias = getattr(previous, "bias", None)
    if bias is not None:
        bias.data.div_(s.to(bias.dtype))
    for layer in balance:
        layer.weight.data.mul_(s.to(layer.weight.dtype))
