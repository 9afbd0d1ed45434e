"""Quantize a model's decoder blocks one at a time (sequential calibration).

Block i is calibrated on the outputs of blocks 0..i−1 *after* they were quantized, so later
blocks learn to absorb earlier error, and peak memory is the model plus one set of block
activations [nsamples, seqlen, hidden] (inputs and outputs), never all blocks' at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from lowbit.algorithms import Method
from lowbit.algorithms.gptq import HessianAccumulator
from lowbit.errors import LowbitError
from lowbit.models.architectures import architecture_of, decoder_blocks
from lowbit.models.loader import check_finite
from lowbit.quantized.modules import QuantLinear, replace_module
from lowbit.schemes.args import QuantizationScheme
from lowbit.schemes.grid import group_size_fallback, resolve_group_size


@dataclass
class LayerReport:
    name: str
    shape: tuple
    scheme: str
    loss: float
    fallback: Optional[str] = None


@dataclass
class QuantizationReport:
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def fallbacks(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.fallback]


def target_linears(block: nn.Module, prefix: str, ignore: tuple) -> dict[str, nn.Linear]:
    """The block's Linear layers by full name, minus those matching an ``ignore`` entry (name or ``re:``)."""

    def ignored(name: str) -> bool:
        return any(re.match(p[3:], name) if p.startswith("re:") else p == name for p in ignore)

    return {
        f"{prefix}.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear) and not ignored(f"{prefix}.{n}")
    }


def _quantize_linears(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    scheme: QuantizationScheme,
    method: Method,
    hessians: dict[str, torch.Tensor],
    report: QuantizationReport,
) -> None:
    """Quantize each Linear (by its full name in ``model``) and swap in a :class:`QuantLinear`."""
    for name, linear in linears.items():
        W = linear.weight.data
        check_finite(f"layer {name}", W)
        args = resolve_group_size(scheme.weights, linear.in_features)
        fallback = group_size_fallback(scheme.weights, args, linear.in_features)
        qw, loss = method.quantize(W, hessians.get(name), args)
        replace_module(model, name, QuantLinear.from_quantized(qw, linear.bias))
        report.layers.append(LayerReport(name, tuple(W.shape), args.describe(), loss, fallback))


class _Captured(Exception):
    pass


Call = tuple[torch.Tensor, dict]  # (hidden states entering a block, that block's keyword arguments)


def _capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]):
    """Hidden states entering block 0 for each batch, and the keyword arguments each block gets for
    each batch (families such as Gemma 3 give sliding-window and global blocks different masks and
    rotary tables). Blocks are swapped for recorders that pass their input through, so this costs
    about an embedding lookup per batch."""
    inputs: list[torch.Tensor] = []
    block_kwargs: list[list[dict]] = [[] for _ in blocks]

    def recorder(i: int):
        def forward(*args, **kw):
            hidden = args[0] if args else kw.pop("hidden_states")
            kw.pop("hidden_states", None)
            for key in ("past_key_values", "past_key_value"):
                kw.pop(key, None)
            kw["use_cache"] = False
            if i == 0:
                inputs.append(hidden)
            block_kwargs[i].append(kw)
            if i == len(blocks) - 1:
                raise _Captured
            return hidden  # only the kwargs of later blocks are recorded, so its shape there does not matter

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        for batch in batches:
            try:
                model(input_ids=batch, use_cache=False)
            except _Captured:
                pass
    finally:
        for block in blocks:
            del block.forward
    return inputs, block_kwargs


def _run_block(block: nn.Module, calls: list[Call]) -> list[torch.Tensor]:
    outputs = []
    for x, kw in calls:
        y = block(x, **kw)
        outputs.append(y[0] if isinstance(y, tuple) else y)
    return outputs


def _collect_hessians(block: nn.Module, linears: dict[str, nn.Linear], calls: list[Call]) -> dict[str, torch.Tensor]:
    """H = 2/n Σ xxᵀ for each Linear's input; Linears fed the same tensor (q/k/v, gate/up) share one H."""
    accumulators: dict[str, HessianAccumulator] = {}
    seen: dict[int, tuple[torch.Tensor, HessianAccumulator]] = {}  # holds x so its id stays unique

    def make_hook(name: str):
        def hook(_module, args, _output):
            x = args[0]
            if name not in accumulators:
                accumulators[name] = seen[id(x)][1] if id(x) in seen else HessianAccumulator(x.shape[-1])
            acc = accumulators[name]
            if id(x) not in seen:
                seen[id(x)] = (x, acc)
                acc.add(x)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
    try:
        for x, kw in calls:
            seen.clear()
            block(x, **kw)
    finally:
        for h in handles:
            h.remove()
    return {name: acc.H for name, acc in accumulators.items()}


@torch.no_grad()
def quantize_blocks(
    model: nn.Module,
    scheme: QuantizationScheme,
    method: Method,
    calibration: Optional[torch.Tensor] = None,
    batch_size: int = 8,
    ignore: tuple = (),
    include_lm_head: bool = False,
    on_block: Optional[Callable[[int, int], None]] = None,
) -> QuantizationReport:
    """Replace every target Linear of every decoder block (and ``lm_head`` if asked) by a
    :class:`QuantLinear`, in place."""
    prefix, blocks = decoder_blocks(model)
    report = QuantizationReport()
    inputs = block_kwargs = None
    if method.needs_calibration:
        if calibration is None:
            raise LowbitError(f"method {method.name} needs calibration text (--calib)")
        batches = list(calibration.split(batch_size))
        inputs, block_kwargs = _capture_block_inputs(model, blocks, batches)
    for i, block in enumerate(blocks):
        block_prefix = f"{prefix}.{i}"
        linears = target_linears(block, block_prefix, ignore)
        calls = None if inputs is None else list(zip(inputs, block_kwargs[i]))
        if method.transform is not None:
            arch = architecture_of(model)
            method.transform(block, calls, scheme.weights, arch.smoothing, arch.norm_offset)
        hessians = _collect_hessians(block, linears, calls) if calls is not None and method.uses_hessian else {}
        _quantize_linears(model, linears, scheme, method, hessians, report)
        if calls is not None and (i + 1 < len(blocks) or include_lm_head):
            inputs = _run_block(block, calls)
        if on_block:
            on_block(i + 1, len(blocks))
    if include_lm_head:
        _quantize_lm_head(model, scheme, method, inputs, report)
    return report


def _quantize_lm_head(model: nn.Module, scheme, method: Method, last_outputs, report: QuantizationReport) -> None:
    """Quantize the output projection on the final-norm activations; a tied embedding stays full precision."""
    arch = architecture_of(model)
    head = model.get_submodule(arch.lm_head)
    hessians = {}
    if last_outputs is not None:
        norm = model.get_submodule(arch.final_norm)
        acc = HessianAccumulator(head.in_features)
        for x in last_outputs:
            acc.add(norm(x))
        hessians[arch.lm_head] = acc.H
    _quantize_linears(model, {arch.lm_head: head}, scheme, method, hessians, report)
    model.config.tie_word_embeddings = False

