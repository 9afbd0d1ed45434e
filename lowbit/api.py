"""The one-call Python API: ``quantize`` a model into a checkpoint, ``evaluate`` a model."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import torch

import lowbit
from lowbit.algorithms import get_method
from lowbit.calibration.sampling import SELF_GENERATED, calibration_windows
from lowbit.calibration.sequential import QuantizationReport, quantize_blocks
from lowbit.compression import check_options, compress_weights, mode_args
from lowbit.data.corpora import calibration_text, evaluation_text
from lowbit.errors import LowbitError
from lowbit.evaluation.footprint import bits_per_weight, folder_size, parameter_count, peak_rss_bytes
from lowbit.evaluation.perplexity import perplexity
from lowbit.formats.checkpoint import atomic_output_dir, check_output_dir
from lowbit.formats.compressed_tensors import read_record, save_quantized
from lowbit.models.architectures import decoder_blocks
from lowbit.models.loader import load_model, resolve
from lowbit.progress import progress_bar
from lowbit.schemes.args import QuantizationScheme, make_scheme

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class QuantizeResult:
    """What ``quantize`` did: where it wrote, how long it took, what it cost."""

    output_dir: Optional[str]
    method: str
    scheme: str
    bits_per_weight: float
    size_bytes: Optional[int]
    wall_time_s: float
    peak_rss_bytes: int
    layers: int
    fallbacks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    distribution: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalResult:
    """Perplexity and footprint of one model on one held-out text."""

    model: str
    quantized: bool
    perplexity: Optional[float]
    eval_tokens: Optional[int]
    seqlen: int
    corpus: Optional[str]
    bits_per_weight: float
    size_bytes: Optional[int]
    parameters: int
    load_time_s: float
    eval_time_s: float
    peak_rss_bytes: int
    recipe: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def quantize(
    model: str,
    scheme: Optional[QuantizationScheme] = None,
    method: str = "gptq",
    calib: Optional[str] = "shakespeare",
    output_dir: Union[str, Path, None] = None,
    nsamples: int = 128,
    seqlen: int = 512,
    overwrite: bool = False,
    ignore: tuple = (),
    include_lm_head: bool = False,
    seed: int = 0,
    batch_size: int = 8,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    return_model: bool = False,
):
    """Quantize ``model`` (name, folder, .gguf or hub id) and save it as a compressed-tensors checkpoint.

    Example: ``lowbit.quantize("smollm2-135m", lowbit.W4A16(group_size=64), method="gptq",
    calib="shakespeare", output_dir="out/smol-w4")``. Returns a :class:`QuantizeResult`
    (and the quantized model too with ``return_model=True``).
    """
    start = time.perf_counter()
    scheme = scheme or make_scheme()
    algorithm = get_method(method)
    problem = algorithm.unsuitable(scheme.weights)
    if problem:
        raise LowbitError(problem)
    if scheme.weights.actorder and not algorithm.uses_actorder:
        scheme = replace(scheme, weights=replace(scheme.weights, actorder=None))
    _check_batch_size(batch_size)
    text = None
    if algorithm.needs_calibration:
        if not calib:
            raise LowbitError(f"method {algorithm.name} needs calibration text: pass --calib")
        text = calibration_text(calib)
    _check_inputs(model, output_dir, overwrite)
    hf_model, tokenizer, source = load_model(model, torch.float32, allow_pickle, trust_remote_code)
    decoder_blocks(hf_model)
    calibration = None
    calib_record = None
    if text is not None:
        calibration = calibration_windows(text, tokenizer, nsamples, seqlen, seed)
        calib_record = {"corpus": text.corpus, "part": text.part, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    with progress_bar(f"{algorithm.name} {scheme.describe()}", progress) as step:
        report: QuantizationReport = quantize_blocks(
            hf_model, scheme, algorithm, calibration, batch_size, tuple(ignore), include_lm_head, on_block=step
        )
    quant_time = time.perf_counter() - start
    fallbacks = fallback_notices(report.fallbacks)
    record = {
        "lowbit_version": lowbit.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source_model": model,
        "method": algorithm.name,
        "scheme": scheme.describe(),
        "weights": scheme.weights.to_dict(),
        "calibration": calib_record,
        "ignored": list(ignore),
        "lm_head_quantized": include_lm_head,
        "group_size_fallbacks": fallbacks,
        "quantization_wall_time_s": round(quant_time, 1),
    }
    result = _save(hf_model, tokenizer, output_dir, overwrite, record, start)
    result.method, result.scheme, result.layers = algorithm.name, scheme.describe(), len(report.layers)
    result.fallbacks, result.notes = fallbacks, consumer_notes(scheme)
    return (result, hf_model, tokenizer) if return_model else result


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise LowbitError(f"batch size must be a positive integer, got {batch_size}")


def _check_inputs(model: str, output_dir, overwrite: bool) -> None:
    """What can be refused before a model is loaded: an already-quantized source, an unwritable output."""
    source = resolve(model)
    if source.quantized:
        raise LowbitError(
            f"{model} is already a quantized checkpoint; quantize the full-precision model it was made from"
            f" (its lowbit_recipe.json names it, as source_model)"
        )
    if output_dir is not None:
        check_output_dir(Path(output_dir), overwrite)


def _save(hf_model, tokenizer, output_dir, overwrite: bool, record: dict, start: float) -> QuantizeResult:
    """Write the checkpoint atomically (when asked) and measure what the caller describes."""
    size = None
    if output_dir is not None:
        with atomic_output_dir(Path(output_dir), overwrite) as staging:
            save_quantized(hf_model, tokenizer, staging, record)
        size = folder_size(Path(output_dir))
    return QuantizeResult(
        output_dir=None if output_dir is None else str(output_dir),
        method="",
        scheme="",
        bits_per_weight=bits_per_weight(hf_model),
        size_bytes=size,
        wall_time_s=time.perf_counter() - start,
        peak_rss_bytes=peak_rss_bytes(),
        layers=0,
    )


def compress(
    model: str,
    output_dir: Union[str, Path, None] = None,
    mode: str = "int4_sym",
    group_size: Optional[int] = 128,
    ratio: float = 1.0,
    method: str = "rtn",
    sensitivity_metric: Optional[str] = None,
    all_layers: bool = False,
    dataset: Optional[str] = None,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    overwrite: bool = False,
    ignore: tuple = (),
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    return_model: bool = False,
):
    """Data-free weight compression of ``model`` into a checkpoint: ``ratio`` of the decoder's
    parameters on the ``mode`` grid, the most sensitive rest in int8 (see :func:`lowbit.compress_weights`).

    ``dataset`` (a text name such as "shakespeare") makes the sensitivity data-aware.
    """
    start = time.perf_counter()
    check_options(mode, group_size or None, ratio, method, sensitivity_metric, bool(dataset))
    text = calibration_text(dataset) if dataset else None
    _check_inputs(model, output_dir, overwrite)
    hf_model, tokenizer, source = load_model(model, torch.float32, allow_pickle, trust_remote_code)
    windows, calib_record = None, None
    if text is not None:
        windows = calibration_windows(text, tokenizer, nsamples, seqlen, seed)
        calib_record = {"corpus": text.corpus, "part": text.part, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    with progress_bar(f"compress {mode} ratio {ratio}", progress) as step:
        report = compress_weights(
            hf_model, mode, group_size or None, ratio, sensitivity_metric, all_layers, windows, method,
            tuple(ignore), on_layer=step,
        )
    if report.sensitivity_metric == "fisher" and not dataset:
        calib_record = {"corpus": "self-generated", "nsamples": SELF_GENERATED[0], "seqlen": SELF_GENERATED[1]}
    record = {
        "lowbit_version": lowbit.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source_model": model,
        "method": method,
        "mode": mode,
        "group_size": group_size,
        "ratio": ratio,
        "sensitivity_metric": report.sensitivity_metric,
        "all_layers": all_layers,
        "calibration": calib_record,
        "ignored": list(ignore),
        "layers": [asdict(layer) for layer in report.layers],
        "group_size_fallbacks": fallback_notices(report.fallbacks),
        "quantization_wall_time_s": round(time.perf_counter() - start, 1),
    }
    result = _save(hf_model, tokenizer, output_dir, overwrite, record, start)
    result.method, result.layers, result.fallbacks = method, len(report.layers), record["group_size_fallbacks"]
    result.scheme = f"{mode} g{group_size} ratio {ratio}" if group_size else f"{mode} per-channel ratio {ratio}"
    result.distribution = report.distribution()
    primary = mode_args(mode, group_size or None)
    result.notes = consumer_notes(make_scheme(primary.num_bits, group_size, primary.symmetric, grid=primary.type))
    return (result, hf_model, tokenizer) if return_model else result


def fallback_notices(layers) -> list[str]:
    """One line per kind of layer (q_proj, …) whose group size fell back, with what it got."""
    return sorted({f"{layer.name.rsplit('.', 1)[-1]}: {layer.fallback}" for layer in layers})


def consumer_notes(scheme: QuantizationScheme) -> list[str]:
    """What known consumers of the checkpoint cannot read, and why."""
    w = scheme.weights
    if w.is_codebook:
        return [f"{w.describe().split()[0]} is a lowbit extension of compressed-tensors (format 'lowbit-codebook'):"
                " lowbit loads it, transformers and vLLM do not"]
    if not w.symmetric and w.num_bits < 8:
        return [
            "transformers 5.23 with compressed-tensors 0.20 cannot load asymmetric pack-quantized checkpoints"
            " (its loader allocates the zero point unpacked while the format packs it); lowbit loads it"
        ]
    return []


def check_eval_inputs(ppl: Optional[str], seqlen: int, dtype: str, batch_size: int):
    """Refuse bad evaluation options before any model is loaded; the held-out text (None without ``ppl``)."""
    if dtype not in DTYPES:
        raise LowbitError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if seqlen < 2:
        raise LowbitError(f"seqlen must be at least 2, got {seqlen}")
    _check_batch_size(batch_size)
    return evaluation_text(ppl) if ppl else None


def evaluate(
    model: str,
    ppl: Optional[str] = "austen",
    seqlen: int = 512,
    max_tokens: Optional[int] = None,
    dtype: str = "float32",
    batch_size: int = 4,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> EvalResult:
    """Perplexity on the held-out part of ``ppl`` plus size, bits/weight, peak memory and time."""
    text = check_eval_inputs(ppl, seqlen, dtype, batch_size)
    start = time.perf_counter()
    hf_model, tokenizer, source = load_model(model, DTYPES[dtype], allow_pickle, trust_remote_code)
    load_time = time.perf_counter() - start
    path = source.path
    result = None
    if text is not None:
        with progress_bar(f"perplexity {text.corpus}", progress) as step:
            result = perplexity(hf_model, tokenizer, text, seqlen, max_tokens, batch_size, on_batch=step)
    return EvalResult(
        model=model,
        quantized=source.quantized,
        perplexity=None if result is None else result.perplexity,
        eval_tokens=None if result is None else result.tokens,
        seqlen=seqlen,
        corpus=None if result is None else result.corpus,
        bits_per_weight=bits_per_weight(hf_model),
        size_bytes=None if path is None else folder_size(path),
        parameters=parameter_count(hf_model),
        load_time_s=load_time,
        eval_time_s=time.perf_counter() - start - load_time,
        peak_rss_bytes=peak_rss_bytes(),
        recipe=read_record(path) if path is not None and path.is_dir() else {},
    )
