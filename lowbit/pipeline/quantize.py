"""The quantization pipeline: apply a :class:`Recipe` to a loaded model, in place.

    1. targets: the decoder blocks' Linears (minus ``ignore``), and the embedding table and head if asked;
    2. with ``ratio`` < 1, rank them by sensitivity and keep the most sensitive at the backup precision;
    3. block by block (sequential calibration): the method's transform (AWQ), the inputs' Hessians
       (GPTQ; GPTAQ also pairs them with the full-precision model's own inputs, carried block by block beside the
       quantized stream, and moves each weight to its asymmetric target first), then each Linear rounded and
       swapped for a :class:`QuantLinear`;
    4. the embedding table and heads;
    5. with a ``kv_cache_scheme``: each quantized block's keys and values on the calibration text give its
       attention's static cache scales ``k_scale`` / ``v_scale`` (buffers, saved as compressed-tensors names them).

Block i is calibrated on the outputs of blocks 0..i−1 *after* they were quantized, so later blocks
learn to absorb earlier error, and peak memory is the model plus one set of block activations
[nsamples, seqlen, hidden] (inputs and outputs), never all blocks' at once.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from lowbit.algorithms import get_method
from lowbit.algorithms.gptq import asymmetric_target
from lowbit.algorithms.mixed_precision import LayerSensitivity, choose_primary, sensitivity
from lowbit.algorithms.smoothquant import smoothquant_transform_block
from lowbit.calibration.sampling import self_generated_windows
from lowbit.calibration.statistics import (
    AbsMax,
    HessianAccumulator,
    activation_second_moments,
    capture_block_inputs,
    collect_asymmetric,
    collect_hessians,
    empirical_fisher,
    input_ranges,
    observe_kv,
    run_block,
)
from lowbit.errors import LowbitError
from lowbit.models.architectures import architecture_of, decoder_blocks
from lowbit.models.loader import check_finite
from lowbit.pipeline.recipe import Recipe, compress_recipe
from lowbit.pipeline.targets import Targets, select_targets
from lowbit.quantized.modules import QuantEmbedding, QuantLinear, quantized_linear, replace_module
from lowbit.schemes.activations import static_scale
from lowbit.schemes.args import QuantizationArgs
from lowbit.schemes.ggml import GGMLType
from lowbit.schemes.kv_cache import SCALE_NAMES, calibrated_scale
from lowbit.schemes.grid import QuantizedWeight, group_size_fallback, resolve_group_size


@dataclass
class LayerReport:
    name: str
    parameters: int
    scheme: str
    bits: int
    loss: Optional[float] = None  # the method's own layer loss (GPTQ: ‖(W − Ŵ) X‖²), where it has one
    sensitivity: Optional[float] = None  # under ratio < 1
    ranked: bool = True  # counts towards ``ratio`` (embeddings and an untied head only when ranked)
    fallback: Optional[str] = None  # why the layer's group size is not the requested one


@dataclass
class QuantizationReport:
    recipe: Recipe
    layers: list[LayerReport] = field(default_factory=list)
    self_generated: bool = False  # the Fisher ranking ran on sequences the model sampled itself
    smoothing: dict[str, Optional[float]] = field(default_factory=dict)  # SmoothQuant's α per smoothed op (None: s = 1)
    input_clipping: dict[str, float] = field(default_factory=dict)  # static input range = r · max|x|: r per Linear
    kv_cache_scales: dict[str, tuple[float, float]] = field(default_factory=dict)  # (k_scale, v_scale) per attention

    @property
    def fallbacks(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.fallback]

    def distribution(self) -> list[dict]:
        """Share of parameters and of layers at each scheme (the table NNCF prints): over all
        quantized layers, and over the ratio-defining ones."""
        total_params = sum(layer.parameters for layer in self.layers) or 1
        ranked_params = sum(layer.parameters for layer in self.layers if layer.ranked) or 1
        rows = []
        for scheme in sorted({layer.scheme for layer in self.layers}):
            members = [layer for layer in self.layers if layer.scheme == scheme]
            rows.append({
                "scheme": scheme,
                "parameters_pct": 100.0 * sum(layer.parameters for layer in members) / total_params,
                "ratio_defining_pct": 100.0 * sum(layer.parameters for layer in members if layer.ranked) / ranked_params,
                "layers_pct": 100.0 * len(members) / len(self.layers),
                "layers": len(members),
            })
        return rows


class _Rounder:
    """Rounds one layer's weight on the primary scheme or the backup, and swaps the module."""

    def __init__(self, model: nn.Module, recipe: Recipe, report: QuantizationReport,
                 grids: Optional[dict[str, GGMLType]] = None):
        self.model, self.recipe, self.report = model, recipe, report
        self.grids = grids or {}  # layers on one of llama.cpp's grids instead of the recipe's
        self.primary: set[str] = set()  # the layers on the primary scheme, set once ranked
        self.cache: dict[str, tuple[QuantizedWeight, Optional[float]]] = {}  # primary roundings made while ranking
        self.scores: dict[str, float] = {}

    def round(self, name: str, W: torch.Tensor, H: Optional[torch.Tensor], on_primary: bool):
        """(QuantizedWeight, loss, fallback notice) of W [out, in]."""
        check_finite(f"layer {name}", W)
        method, requested = self.recipe.method, self.recipe.scheme.weights
        if not on_primary:
            backup = get_method("rtn") if method.own_grid else method
            return (*backup.quantize(W, None, self.recipe.backup), None)
        if name in self.grids:
            return (*method.quantize(W, H, self.grids[name]), None)
        args = resolve_group_size(requested, W.shape[1])
        qw, loss = self.cache.pop(name, None) or method.quantize(W, H, args)
        return qw, loss, group_size_fallback(requested, args, W.shape[1])

    def linear(self, name: str, linear: nn.Linear, H: Optional[torch.Tensor] = None, ranked: bool = True,
               in_block: bool = False, input_scale: Optional[torch.Tensor] = None) -> None:
        """Round and swap one Linear; a decoder block's (``in_block``) gets the recipe's activation scheme."""
        on_primary = name in self.primary
        qw, loss, fallback = self.round(name, linear.weight.data, H, on_primary)
        acts = self.recipe.scheme.input_activations if in_block else None
        replace_module(self.model, name, quantized_linear(qw, linear.bias, acts, input_scale))
        self._note(name, linear.weight, qw.args, loss, ranked, fallback)

    def embedding(self, name: str, embedding: nn.Embedding, tied_head: Optional[str], ranked: bool) -> None:
        """The table, and a tied head reading the same quantized table."""
        qw, loss, fallback = self.round(name, embedding.weight.data, None, name in self.primary)
        replace_module(self.model, name, QuantEmbedding.from_quantized(qw, getattr(embedding, "embed_scale", None)))
        if tied_head is not None:
            replace_module(self.model, tied_head, QuantLinear.from_quantized(qw))
        self._note(name, embedding.weight, qw.args, loss, ranked, fallback)

    def _note(self, name, weight, args: Union[QuantizationArgs, GGMLType], loss, ranked: bool, fallback) -> None:
        self.report.layers.append(LayerReport(
            name, weight.numel(), args.describe(), args.num_bits, loss, self.scores.get(name), ranked, fallback
        ))


def _rank(model: nn.Module, recipe: Recipe, ranked: dict[str, nn.Module], rounder: _Rounder,
          calibration: Optional[torch.Tensor], report: QuantizationReport) -> set[str]:
    """Names of the layers that get the primary scheme: all, or under ``ratio`` the least sensitive."""
    if recipe.ratio >= 1.0:
        return set(ranked)
    metric = recipe.sensitivity_metric
    moments = fisher = None
    if metric == "hessian_input_activation":
        moments = activation_second_moments(model, [n for n, m in ranked.items() if isinstance(m, nn.Linear)], calibration)
    if metric == "fisher":
        report.self_generated = calibration is None
        fisher = empirical_fisher(model, list(ranked), self_generated_windows(model) if calibration is None else calibration)
    layers = []
    for name, module in ranked.items():
        W = module.weight.data
        qw, loss, _ = rounder.round(name, W, None, on_primary=True)
        rounder.cache[name] = (qw, loss)
        act = None if moments is None else moments.get(name)
        score = sensitivity(W, qw.dequantize(torch.float32), act, None if fisher is None else fisher.pop(name))
        rounder.scores[name] = score
        layers.append(LayerSensitivity(name, W.numel(), score))
    chosen = choose_primary(layers, recipe.ratio)
    for name in set(ranked) - chosen:
        rounder.cache.pop(name)
    return chosen


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    calibration: Optional[torch.Tensor] = None,
    batch_size: int = 8,
    on_step: Optional[Callable[[int, int], None]] = None,
    grids: Optional[dict[str, GGMLType]] = None,
) -> QuantizationReport:
    """Apply ``recipe`` to ``model`` in place; ``calibration``: token windows [n, seqlen] (None: no data);
    ``grids``: the linears that land on one of llama.cpp's grids instead of the recipe's (a GGUF preset's types)."""
    recipe = recipe.checked(has_data=calibration is not None)
    if recipe.kv_cache_scheme is not None and architecture_of(model).lean is None:
        raise LowbitError(f"a quantized KV cache runs on lowbit's lean decoder, which does not take"
                          f" {model.config.model_type}; drop --kv-cache")
    targets = select_targets(model, recipe.ignore, recipe.embeddings, recipe.include_lm_head)
    report = QuantizationReport(recipe)
    rounder = _Rounder(model, recipe, report, grids)
    extra_ranked = recipe.embeddings == "ranked"
    rounder.primary = _rank(model, recipe, targets.ranked(extra_ranked), rounder, calibration, report)
    outputs = _quantize_blocks(model, recipe, targets, rounder, calibration, batch_size, on_step, report)
    for name, module in targets.extra.items():
        if isinstance(module, nn.Embedding):
            rounder.embedding(name, module, targets.tied_head, extra_ranked)
        else:
            rounder.linear(name, module, ranked=extra_ranked)
    if targets.lm_head is not None:
        _quantize_lm_head(model, targets.lm_head, rounder, outputs)
    return report


def _quantize_blocks(model, recipe: Recipe, targets: Targets, rounder: _Rounder, calibration, batch_size, on_step,
                     report: QuantizationReport):
    """Steps 3 of the module docstring; the last block's outputs (None without data)."""
    method, acts = recipe.method, recipe.scheme.input_activations
    blocks_path, blocks = decoder_blocks(model)
    arch = architecture_of(model)
    inputs = block_kwargs = None
    if recipe.needs_data:
        inputs, block_kwargs = capture_block_inputs(model, blocks, list(calibration.split(batch_size)))
    fp_inputs = inputs  # the full-precision model's stream, for an asymmetric method
    for i, block in enumerate(blocks):
        linears = targets.blocks[i]
        calls = None if inputs is None else list(zip(inputs, block_kwargs[i]))
        if recipe.smoothquant is not None:
            chosen = smoothquant_transform_block(block, calls, arch.smoothing, recipe.smoothquant, arch.norm_offset)
            report.smoothing.update({f"{blocks_path}.{i}.{op}": alpha for op, alpha in chosen.items()})
        if method.transform is not None:
            method.transform(block, calls, recipe.scheme.weights, arch.smoothing, arch.norm_offset)
        hessians = {}
        if calls is not None and method.asymmetric:
            fp_calls = list(zip(fp_inputs, block_kwargs[i]))
            hessians, crosses, fp_inputs = collect_asymmetric(block, linears, calls, fp_calls)
            for name, linear in linears.items():
                linear.weight.data = asymmetric_target(linear.weight.data, crosses[name], hessians[name])
        elif calls is not None and method.uses_hessian:
            hessians = collect_hessians(block, linears, calls)
        ranges = input_ranges(block, linears, calls, acts) if acts and not acts.dynamic else {}
        report.input_clipping.update({name: r for name, (_, r) in ranges.items()})
        for name, linear in linears.items():
            rng = ranges.get(name)
            rounder.linear(name, linear, hessians.get(name), in_block=True,
                           input_scale=None if rng is None else static_scale(rng[0], acts))
        kv = recipe.kv_cache_scheme is not None
        if calls is not None and (i + 1 < len(blocks) or targets.lm_head is not None or kv):
            amax, attention = AbsMax(), block.get_submodule(arch.lean.attention) if kv else None
            with observe_kv(attention, amax) if kv else nullcontext():
                inputs = run_block(block, calls)
            if kv:
                report.kv_cache_scales[f"{blocks_path}.{i}.{arch.lean.attention}"] = _set_kv_scales(attention, amax)
        if on_step:
            on_step(i + 1, len(blocks))
    return inputs


def _set_kv_scales(attention: nn.Module, amax: AbsMax) -> tuple[float, float]:
    """Attach the static fp8 cache scales max |K| / 448, max |V| / 448 to the attention module."""
    for name, m in zip(SCALE_NAMES, (amax.k, amax.v)):
        attention.register_buffer(name, calibrated_scale(m))
    return float(attention.k_scale), float(attention.v_scale)


def _quantize_lm_head(model: nn.Module, name: str, rounder: _Rounder, last_outputs) -> None:
    """The output projection on the final-norm activations; a tied embedding stays full precision."""
    head = model.get_submodule(name)
    H = None
    if last_outputs is not None:
        norm = model.get_submodule(architecture_of(model).final_norm)
        acc = HessianAccumulator(head.in_features)
        for x in last_outputs:
            acc.add(norm(x))
        H = acc.H
    rounder.primary.add(name)
    rounder.linear(name, head, H, ranked=False)
    model.config.tie_word_embeddings = False


def compress_weights(
    model: nn.Module,
    mode: str = "int4_sym",
    group_size: Optional[int] = 128,
    ratio: float = 1.0,
    sensitivity_metric: Optional[str] = None,
    all_layers: bool = False,
    dataset: Optional[torch.Tensor] = None,
    method: str = "rtn",
    ignore: tuple = (),
    on_step: Optional[Callable[[int, int], None]] = None,
) -> QuantizationReport:
    """NNCF-style data-free compression of a loaded model in place:
    ``lowbit.compress_weights(model, mode="int4_asym", group_size=64, ratio=0.9)``.

    ``ratio`` of the decoder's parameters land on the ``mode`` grid, the most sensitive rest in int8
    (see :mod:`lowbit.algorithms.mixed_precision`); the embedding table (and an lm_head tied to it,
    which then reads the same quantized table) and an untied lm_head are int8 per-channel, unless
    ``all_layers`` ranks them with the rest. ``dataset``: token windows [n, seqlen] for data-aware
    sensitivity (default metric then ``fisher``); without it ``weight_error``, or ``fisher`` on
    sequences the model samples itself (~40 s for SmolLM2). ``method``: any data-free method.
    """
    recipe = compress_recipe(mode, group_size, ratio, method, sensitivity_metric, all_layers, tuple(ignore))
    return quantize_model(model, recipe, dataset, on_step=on_step)
