"""Data-free (or lightly data-aware) weight compression of a loaded model, NNCF style:

    lowbit.compress_weights(model, mode="int4_asym", group_size=64, ratio=0.9)

Every Linear in the decoder blocks is put on the ``mode`` grid by a data-free method (RTN or HQQ),
except the most sensitive ones, which keep 8 bits until ``ratio`` of the parameters is in ``mode``
(see :mod:`lowbit.algorithms.mixed_precision`). Modules are swapped for :class:`QuantLinear`
in place, so the result saves with :func:`lowbit.formats.compressed_tensors.save_quantized`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.algorithms import data_free_methods, get_method
from lowbit.algorithms.mixed_precision import SENSITIVITY_METRICS, LayerSensitivity, choose_primary, sensitivity
from lowbit.calibration.sampling import self_generated_windows
from lowbit.calibration.sequential import target_linears
from lowbit.errors import LowbitError
from lowbit.models.architectures import architecture_of, decoder_blocks
from lowbit.models.loader import check_finite
from lowbit.quantized.modules import QuantEmbedding, QuantLinear, replace_module
from lowbit.schemes.args import QuantizationArgs
from lowbit.schemes.grid import group_size_fallback, resolve_group_size

# mode → (bits, symmetric, grid type); 8-bit modes are per-channel, as in NNCF.
MODES = {
    "int4_sym": (4, True, "int"),
    "int4_asym": (4, False, "int"),
    "nf4": (4, True, "nf"),
    "fp4": (4, True, "float"),
    "int3_sym": (3, True, "int"),
    "int3_asym": (3, False, "int"),
    "int2_sym": (2, True, "int"),
    "int2_asym": (2, False, "int"),
    "int8_sym": (8, True, "int"),
    "int8_asym": (8, False, "int"),
}
BACKUP = QuantizationArgs(num_bits=8, symmetric=True, strategy="channel", group_size=None, observer="minmax")


@dataclass
class CompressedLayer:
    name: str
    parameters: int
    scheme: str
    bits: int
    sensitivity: Optional[float] = None
    ranked: bool = True  # counts towards ``ratio`` (embeddings and lm_head do only with all_layers)
    fallback: Optional[str] = None  # why the layer's group size is not the requested one


@dataclass
class CompressionReport:
    mode: str
    ratio: float
    method: str
    sensitivity_metric: Optional[str]
    layers: list[CompressedLayer] = field(default_factory=list)

    @property
    def fallbacks(self) -> list[CompressedLayer]:
        return [layer for layer in self.layers if layer.fallback]

    def distribution(self) -> list[dict]:
        """Share of parameters and of layers at each bit-width (the table NNCF prints): over all
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


def mode_args(mode: str, group_size: Optional[int], observer: str = "mse") -> QuantizationArgs:
    """QuantizationArgs of a compression ``mode`` ("int4_sym", "nf4", …) with ``group_size`` (None = per-channel)."""
    if mode not in MODES:
        raise LowbitError(f"mode {mode!r} is not supported; choose one of {', '.join(MODES)}")
    bits, symmetric, grid = MODES[mode]
    if bits == 8:
        group_size = None
    return QuantizationArgs(
        num_bits=bits, type=grid, symmetric=symmetric, strategy="group" if group_size else "channel",
        group_size=group_size, observer=observer,
    )


def check_options(
    mode: str, group_size: Optional[int], ratio: float, method: str, metric: Optional[str], has_dataset: bool
) -> str:
    """Refuse bad options before any work; returns the sensitivity metric that will be used."""
    args = mode_args(mode, group_size)
    if not 0.0 <= ratio <= 1.0:
        raise LowbitError(f"ratio must be between 0 and 1, got {ratio}")
    if method not in data_free_methods():
        raise LowbitError(f"compress takes a data-free method ({', '.join(data_free_methods())}); got {method!r}")
    problem = get_method(method).unsuitable(args)
    if problem:
        raise LowbitError(problem)
    metric = metric or ("fisher" if has_dataset else "weight_error")
    if metric not in SENSITIVITY_METRICS:
        raise LowbitError(f"sensitivity metric {metric!r} is not supported; choose one of {', '.join(SENSITIVITY_METRICS)}")
    if metric == "hessian_input_activation" and not has_dataset:
        raise LowbitError("sensitivity metric 'hessian_input_activation' needs a dataset (calibration text)")
    return metric


def _target_layers(model: nn.Module, all_layers: bool, ignore: tuple):
    """(ranked layers, layers fixed at the backup precision, name of an lm_head tied to the embeddings).

    Decoder linears are ranked; the embedding table and an untied lm_head are fixed at int8 unless
    ``all_layers``. A tied lm_head is not a layer of its own: it follows the embedding.
    """
    prefix, blocks = decoder_blocks(model)
    ranked: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        ranked.update(target_linears(block, f"{prefix}.{i}", ignore))
    fixed: dict[str, nn.Module] = {}
    arch = architecture_of(model)
    head = model.get_submodule(arch.lm_head)
    embedding = model.get_input_embeddings()
    embedding_name = next(n for n, m in model.named_modules() if m is embedding)
    tied = getattr(head, "weight", None) is getattr(embedding, "weight", None)
    if isinstance(embedding, nn.Embedding) and embedding_name not in ignore:
        (ranked if all_layers else fixed)[embedding_name] = embedding
    if isinstance(head, nn.Linear) and not tied and arch.lm_head not in ignore:
        (ranked if all_layers else fixed)[arch.lm_head] = head
    return ranked, fixed, arch.lm_head if tied and embedding_name in {**ranked, **fixed} else None


@torch.no_grad()
def activation_second_moments(model: nn.Module, names: list[str], windows: torch.Tensor, batch_size: int = 8):
    """h_j = mean over tokens of x_j² for the input of each named Linear (the Hessian's diagonal / 2)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_module, args, _output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        for batch in windows.split(batch_size):
            model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def empirical_fisher(model: nn.Module, names: list[str], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """F_ij = mean over sequences s of (∂L_s/∂W_ij)² for the weight of each named module, L_s the
    summed next-token loss of window s (one backward pass per window). Memory: two copies of the
    named weights (gradient and running sum)."""
    weights = {n: model.get_submodule(n).weight for n in names}
    wanted = {id(w) for w in weights.values()}
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    fisher = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    try:
        with torch.enable_grad():
            for window in windows.split(1):
                logits = model(input_ids=window, use_cache=False).logits
                loss = F.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="sum")
                grads = torch.autograd.grad(loss, list(weights.values()))
                for n, g in zip(weights, grads):
                    fisher[n].addcmul_(g, g, value=1 / len(windows))
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(previous[name])
    return fisher


@torch.no_grad()
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
    on_layer: Optional[Callable[[int, int], None]] = None,
) -> CompressionReport:
    """Quantize ``model``'s Linears in place: ``ratio`` of the parameters in ``mode``, the rest int8.

    ``dataset``: token windows [n, seqlen] for data-aware sensitivity (default metric then
    ``fisher``, else ``hessian_input_activation``); without it the metric is ``weight_error``, or
    ``fisher`` on sequences the model samples itself (no data; ~40 s for SmolLM2). ``method``: "rtn"
    or "hqq" (data-free). The embedding table (and an lm_head tied to it, which then reads the same
    quantized table) and an untied lm_head are int8 per-channel, unless ``all_layers`` ranks them
    with the rest; ``ignore`` (e.g. "model.embed_tokens") keeps a module in full precision.
    """
    metric = check_options(mode, group_size, ratio, method, sensitivity_metric, dataset is not None)
    primary = mode_args(mode, group_size)
    algorithm = get_method(method)
    ranked, fixed, tied_head = _target_layers(model, all_layers, tuple(ignore))
    stats = fisher = None
    if ratio < 1.0 and metric == "hessian_input_activation":
        linears = [n for n, m in ranked.items() if isinstance(m, nn.Linear)]
        stats = activation_second_moments(model, linears, dataset)
    if ratio < 1.0 and metric == "fisher":
        windows = self_generated_windows(model) if dataset is None else dataset
        fisher = empirical_fisher(model, list(ranked), windows)

    total = len(ranked) + len(fixed)
    done = 0
    primary_results, sensitivities, fallbacks = {}, [], {}
    for name, linear in ranked.items():
        W = linear.weight.data
        check_finite(f"layer {name}", W)
        fitted = resolve_group_size(primary, W.shape[1])
        qw, _ = algorithm.quantize(W, None, fitted)
        primary_results[name] = qw
        fallbacks[name] = group_size_fallback(primary, fitted, W.shape[1])
        if ratio < 1.0:
            act = None if stats is None else stats.get(name)
            fisher_diag = None if fisher is None else fisher.pop(name)
            score = sensitivity(W, qw.dequantize(torch.float32), act, fisher_diag)
            sensitivities.append(LayerSensitivity(name, W.numel(), score))
    chosen = set(ranked) if ratio >= 1.0 else choose_primary(sensitivities, ratio)
    scores = {s.name: s.sensitivity for s in sensitivities}

    report = CompressionReport(mode, ratio, method, metric if ratio < 1.0 else None)
    for name, linear in {**ranked, **fixed}.items():
        if name in chosen:
            qw = primary_results[name]
        else:
            qw, _ = (get_method("rtn") if algorithm.own_grid else algorithm).quantize(linear.weight.data, None, BACKUP)
        if isinstance(linear, nn.Embedding):
            replace_module(model, name, QuantEmbedding.from_quantized(qw, getattr(linear, "embed_scale", None)))
            if tied_head is not None:  # the output projection reads the same quantized table
                replace_module(model, tied_head, QuantLinear.from_quantized(qw))
        else:
            replace_module(model, name, QuantLinear.from_quantized(qw, linear.bias))
        report.layers.append(
            CompressedLayer(name, linear.weight.numel(), qw.args.describe(), qw.args.num_bits, scores.get(name),
                            name in ranked, fallbacks.get(name) if name in chosen else None)
        )
        done += 1
        if on_layer:
            on_layer(done, total)
    return report
