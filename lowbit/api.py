"""The one-call Python API: ``quantize`` a model into a checkpoint, ``evaluate`` a model."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import torch

import lowbit
from lowbit.algorithms import METHODS, get_method
from lowbit.calibration.sampling import SELF_GENERATED, CalibrationSpec
from lowbit.data.corpora import EvaluationText, calibration_text, evaluation_text
from lowbit.errors import LowbitError
from lowbit.evaluation.footprint import bits_per_weight, folder_size, parameter_count, peak_rss_bytes
from lowbit.evaluation.perplexity import check_protocol, perplexity
from lowbit.evaluation import harness
from lowbit.evaluation.kv_attention import use_kv_cache_format
from lowbit.evaluation.tasks import TASKS, get_tasks
from lowbit.formats.checkpoint import atomic_output_dir, atomic_output_file, check_output_dir, check_output_file
from lowbit.formats.gguf.metadata import tokenizer_fields
from lowbit.formats.gguf.presets import check_preset, search_scheme
from lowbit.formats.gguf.tokenizer import hf_tokenizer_fields
from lowbit.formats.gguf.writer import check_dense_type, check_representable, linear_types, write_gguf
from lowbit.formats.compressed_tensors import read_record, save_quantized
from lowbit.models.architectures import architecture_for, decoder_blocks, gguf_architecture
from lowbit.models.loader import dtype_named, gguf_tokenizer_file, load_model, resolve
from lowbit.pipeline.quantize import quantize_model
from lowbit.pipeline.recipe import Recipe, compress_recipe
from lowbit.progress import progress_bar
from lowbit.runtime.kv_cache import calibrated_scales
from lowbit.schemes.args import QuantizationScheme, make_scheme
from lowbit.schemes.kv_cache import calibrated_scheme, kv_format


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
    bits_per_byte: Optional[float]
    word_perplexity: Optional[float]
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
    tasks: dict = field(default_factory=dict)  # name → TaskResult.to_dict()
    kv_cache: Optional[str] = None  # the cache format K and V were read through ("fp8 static": calibrated scales; None: full precision)
    protocol: str = "lowbit"  # the perplexity windowing: lowbit's or llama-perplexity's
    perplexity_stderr: Optional[float] = None  # llama-perplexity's ± (its protocol only)

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
    smoothquant: Union[float, str, None] = None,
    kv_cache: Optional[str] = None,
    gguf: Optional[str] = None,
    dense_type: Optional[str] = None,
):
    """Quantize ``model`` (name, folder, .gguf or hub id) and save it as a compressed-tensors checkpoint, or with
    ``gguf`` (a llama.cpp file type: Q4_0, Q4_K_M, Q3_K_M, Q2_K, …) as a GGUF file that llama.cpp runs: each linear
    gets the type llama.cpp's rules give it in that file type, the method rounds onto that type's grid (with its
    float16 scales), and the codes go into the file unchanged. The tensors no method rounds (the embedding table)
    get the file type's choice by RTN, or ``dense_type`` (Q8_0, F16, F32). With ``gguf`` only ``scheme``'s
    column order (actorder) is used.

    Example: ``lowbit.quantize("smollm2-135m", lowbit.W4A16(group_size=64), method="gptq",
    calib="shakespeare", output_dir="out/smol-w4")``. Returns a :class:`QuantizeResult`
    (and the quantized model too with ``return_model=True``). ``calib`` is read only where data is needed
    (the method, ``smoothquant``: α or "auto", static activation scales). Activation schemes: ``lowbit.W8A8()``,
    ``W8A8_STATIC()``, ``W4A8()``. ``kv_cache="fp8"``: calibrate the KV cache's static fp8 scales too (saved as
    compressed-tensors' ``kv_cache_scheme`` with each attention's ``k_scale`` / ``v_scale``; the runtime and
    ``evaluate`` then cache K and V in fp8 by default).
    """
    algorithm = get_method(method)
    if gguf is not None:
        gguf = check_preset(gguf)
        if kv_cache is not None or smoothquant is not None or (scheme and scheme.input_activations):
            raise LowbitError("a GGUF file holds weights only: drop the activation scheme, KV cache scales and SmoothQuant")
        if not algorithm.ggml:
            ggml_methods = ", ".join(name for name, m in METHODS.items() if m.ggml)
            raise LowbitError(f"{algorithm.name} does not round onto llama.cpp's grids; with --gguf use {ggml_methods}")
        scheme = search_scheme(gguf, "weight" if scheme is None else scheme.weights.actorder)
    recipe = Recipe(scheme or make_scheme(), algorithm, ignore=tuple(ignore), include_lm_head=include_lm_head,
                    smoothquant=smoothquant, kv_cache_scheme=None if kv_cache is None else calibrated_scheme(kv_cache))
    calib = calib if recipe.needs_data else None
    output = _Output(None if output_dir is None else Path(output_dir), overwrite, gguf is not None, dense_type, gguf)
    return _run(model, recipe, calib, nsamples, seqlen, seed, output, batch_size,
                (allow_pickle, trust_remote_code), progress, return_model)


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
    recipe = compress_recipe(mode, group_size, ratio, method, sensitivity_metric, all_layers, tuple(ignore))
    output = _Output(None if output_dir is None else Path(output_dir), overwrite)
    return _run(model, recipe, dataset, nsamples, seqlen, seed, output, 8,
                (allow_pickle, trust_remote_code), progress, return_model)


def export(checkpoint: str, output: Union[str, Path], dense_type: Optional[str] = None, overwrite: bool = False) -> dict:
    """Write a quantized checkpoint (or a full-precision model) as a GGUF file, each quantized linear in the
    llama.cpp type that holds its grid code for code; a grid no type holds is refused, naming the types. The other
    matrices get what llama.cpp's file type of that type gives them, or ``dense_type`` (Q8_0 for a model with no
    quantized linears)."""
    start = time.perf_counter()
    out = _Output(Path(output), overwrite, gguf=True, dense_type=dense_type)
    out.check()
    hf_model, tokenizer, _ = load_model(checkpoint, torch.float32)
    gguf_architecture(hf_model)
    check_representable(hf_model)
    vocab = gguf_tokenizer(checkpoint, tokenizer, hf_model)
    source = resolve(checkpoint)
    written = out.save(hf_model, tokenizer, checkpoint, read_record(source.path) if source.kind == "folder" else {},
                       vocab)
    return {"output": str(output), "size_bytes": out.path.stat().st_size, "file_type": written.file_type,
            "bits_per_weight": written.bits_per_weight, "wall_time_s": round(time.perf_counter() - start, 1)}


@dataclass(frozen=True)
class _Output:
    """Where a quantized model goes: a compressed-tensors folder, or a GGUF file."""

    path: Optional[Path]
    overwrite: bool
    gguf: bool = False
    dense_type: Optional[str] = None
    preset: Optional[str] = None  # the llama.cpp file type that ``quantize --gguf`` rounds for

    def check(self) -> None:
        """What can be refused before the model is loaded."""
        if self.path is None:
            return
        if not self.gguf:
            return check_output_dir(self.path, self.overwrite)
        check_dense_type(self.dense_type)
        check_output_file(self.path, self.overwrite)

    def save(self, hf_model, tokenizer, model: str, record: dict, vocab: Optional[list] = None):
        """Write atomically; None (no path), the GGUF writer's :class:`Written`, or the folder's size. ``vocab``: a
        GGUF file's tokenizer keys (:func:`gguf_tokenizer`)."""
        if self.path is None:
            return None
        if not self.gguf:
            with atomic_output_dir(self.path, self.overwrite) as staging:
                save_quantized(hf_model, tokenizer, staging, record)
            return folder_size(self.path)
        with atomic_output_file(self.path, self.overwrite) as staging:
            return write_gguf(hf_model, gguf_architecture(hf_model), staging, vocab, Path(model).name,
                              self.dense_type, record, self.preset)

    def grids(self, hf_model, recipe: Recipe):
        """For ``quantize --gguf``: each linear's llama.cpp type (with the recipe's column order), and the recipe
        with the linears no type fits (F16 in the file) left alone."""
        if self.preset is None:
            return None, recipe
        types = linear_types(hf_model, gguf_architecture(hf_model), self.preset)
        order = recipe.scheme.weights.actorder
        grids = {name: replace(kind, actorder=order) for name, kind in types.items() if kind is not None}
        return grids, replace(recipe, ignore=recipe.ignore + tuple(name for name, kind in types.items() if kind is None))


def _run(model: str, recipe: Recipe, calib: Optional[str], nsamples: int, seqlen: int, seed: int, output: _Output,
         batch_size: int, load_options: tuple, progress: bool, return_model: bool):
    """The one body of ``quantize`` and ``compress``: check everything that can be checked, load,
    run the pipeline, save atomically, measure."""
    start = time.perf_counter()
    recipe = recipe.checked(has_data=calib is not None)
    _check_batch_size(batch_size)
    calibration = None if calib is None else CalibrationSpec(calibration_text(calib), nsamples, seqlen, seed)
    _check_inputs(model, output)
    hf_model, tokenizer, _ = load_model(model, torch.float32, *load_options)
    decoder_blocks(hf_model)
    vocab = None
    if output.gguf:
        gguf_architecture(hf_model)
        vocab = gguf_tokenizer(model, tokenizer, hf_model)
    grids, recipe = output.grids(hf_model, recipe)
    described = f"GGUF {output.preset}" if output.preset else recipe.describe()
    windows = None if calibration is None else calibration.windows(tokenizer)
    with progress_bar(f"{recipe.method.name} {described}", progress) as step:
        report = quantize_model(hf_model, recipe, windows, batch_size, on_step=step, grids=grids)
    fallbacks = fallback_notices(report.fallbacks)
    calib_record = None if calibration is None else calibration.record()
    if report.self_generated:
        calib_record = {"corpus": "self-generated", "nsamples": SELF_GENERATED[0], "seqlen": SELF_GENERATED[1]}
    record = {
        "lowbit_version": lowbit.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source_model": model,
        **recipe.record(),
        "calibration": calib_record,
        "layers": [asdict(layer) for layer in report.layers],
        "smoothquant_alpha": report.smoothing or None,
        "static_input_clipping": report.input_clipping or None,
        "kv_cache_scales": report.kv_cache_scales or None,
        "group_size_fallbacks": fallbacks,
        "quantization_wall_time_s": round(time.perf_counter() - start, 1),
    }
    if output.preset:  # the grid is per layer (``layers``); the recipe's scheme was only AWQ's search grid
        record.update(scheme=described, weights=None, gguf_file_type=output.preset)
    saved = output.save(hf_model, tokenizer, model, record, vocab)
    result = QuantizeResult(
        output_dir=None if output.path is None else str(output.path),
        method=recipe.method.name,
        scheme=described,
        bits_per_weight=saved.bits_per_weight if output.gguf and saved else bits_per_weight(hf_model),
        size_bytes=output.path.stat().st_size if output.gguf and saved else saved,
        wall_time_s=time.perf_counter() - start,
        peak_rss_bytes=peak_rss_bytes(),
        layers=len(report.layers),
        fallbacks=fallbacks,
        notes=([] if output.gguf else consumer_notes(recipe.scheme)) + alpha_notes(report.smoothing),
        distribution=report.distribution(),
    )
    return (result, hf_model, tokenizer) if return_model else result


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise LowbitError(f"batch size must be a positive integer, got {batch_size}")


def _check_inputs(model: str, output: _Output) -> None:
    """What can be refused before a model is loaded: an already-quantized source, an unwritable output."""
    source = resolve(model)
    if source.quantized:
        raise LowbitError(
            f"{model} is already a quantized checkpoint; quantize the full-precision model it was made from"
            f" (its lowbit_recipe.json names it, as source_model)"
        )
    if source.kind == "folder":  # a family without a record is refused before the load
        try:
            model_type = json.loads((source.path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = ""  # unreadable: the loader says why
        if model_type != "":
            architecture_for(model_type)
    output.check()


def gguf_tokenizer(model: str, tokenizer, hf_model) -> list:
    """A GGUF export's tokenizer keys: those of the model's own GGUF file where it has one (field for field),
    otherwise its Hugging Face tokenizer converted (:func:`hf_tokenizer_fields`, which refuses what it cannot
    name)."""
    source = gguf_tokenizer_file(model)
    if source is not None:
        return tokenizer_fields(source)
    return hf_tokenizer_fields(tokenizer, hf_model.config.vocab_size)


def fallback_notices(layers) -> list[str]:
    """One line per kind of layer (q_proj, …) whose group size fell back, with what it got."""
    return sorted({f"{layer.name.rsplit('.', 1)[-1]}: {layer.fallback}" for layer in layers})


def alpha_notes(smoothing: dict) -> list[str]:
    """SmoothQuant's α per kind of smoothed op, counted over the blocks ("input_layernorm: 0.5 ×12, off ×2");
    every op's own is in the checkpoint's lowbit_recipe.json (smoothquant_alpha)."""
    by_kind: dict[str, dict[str, int]] = {}
    for name, alpha in smoothing.items():
        kind = re.sub(r"^.*?\.\d+\.", "", name)
        label = "off" if alpha is None else f"{alpha:g}"
        by_kind.setdefault(kind, {}).setdefault(label, 0)
        by_kind[kind][label] += 1
    return [f"SmoothQuant alpha, {kind}: " + ", ".join(f"{a} x{n}" for a, n in sorted(counts.items()))
            for kind, counts in by_kind.items()]


def consumer_notes(scheme: QuantizationScheme) -> list[str]:
    """What known consumers of a compressed-tensors checkpoint cannot read, and why (a GGUF file has llama.cpp's
    types, whatever grid AWQ's search used)."""
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


@dataclass
class EvalPlan:
    """What ``evaluate`` will score, all built before the model loads."""

    text: Optional[EvaluationText]
    offline: dict  # name → (Task, items)
    harness: dict  # lm-eval's task dict (empty without lm-eval tasks)
    limit: Optional[int] = None  # items per task (None: each task's own size)


def check_eval_inputs(ppl: Optional[str], seqlen: int, dtype: str, batch_size: int, tasks: tuple = (),
                      seed: int = 0, include_path: Optional[str] = None, limit: Optional[int] = None,
                      kv_cache: Optional[str] = None, protocol: str = "lowbit") -> EvalPlan:
    """Refuse bad evaluation options before any model is loaded, and build what will be scored."""
    dtype_named(dtype)
    check_protocol(protocol)
    if protocol == "llama.cpp" and seqlen < 4:
        raise LowbitError(f"llama.cpp's protocol scores the second half of each window: seqlen must be at least 4")
    if kv_cache is not None:
        kv_format(kv_cache)
    if seqlen < 2:
        raise LowbitError(f"seqlen must be at least 2, got {seqlen}")
    _check_batch_size(batch_size)
    if limit is not None and limit < 2:
        raise LowbitError(f"limit must be at least 2 items per task (a standard error needs two), got {limit}")
    offline = [name for name in tasks if name in TASKS]
    others = [name for name in tasks if name not in TASKS]
    if offline and not ppl:
        raise LowbitError("offline tasks are built from a held-out text: pass --ppl TEXT (e.g. austen)")
    if others and not harness.AVAILABLE and not include_path:
        raise LowbitError(f"unknown task {others[0]!r}; offline tasks: {', '.join(TASKS)}; lm-evaluation-harness"
                          " tasks need lm-eval: pip install 'lowbit[lm-eval]'")
    text = evaluation_text(ppl) if ppl else None
    built = {task.name: (task, task.build(text, seed, limit)) for task in get_tasks(offline)}
    return EvalPlan(text, built, harness.load_tasks(others, include_path) if others else {}, limit)


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
    tasks: tuple = (),
    seed: int = 0,
    include_path: Optional[str] = None,
    limit: Optional[int] = None,
    kv_cache: Optional[str] = None,
    protocol: str = "lowbit",
) -> EvalResult:
    """Perplexity (and bits per byte, word perplexity) on the held-out part of ``ppl`` (``protocol``
    "llama.cpp": llama-perplexity's windows, the second half of each scored, with its ±), the offline
    ``tasks`` built from it ("lambada", "nextsent": accuracy ± standard error) or lm-evaluation-harness
    tasks by name (``include_path``: a folder of task YAMLs; ``limit``: items per task), plus size,
    bits/weight, peak memory and time. ``kv_cache``: read K and V as that runtime cache format stores them
    (bf16, int8, fp8, int4; :mod:`lowbit.evaluation.kv_attention`); by default a checkpoint's calibrated fp8
    cache (as the runtime runs it), else full precision."""
    plan = check_eval_inputs(ppl, seqlen, dtype, batch_size, tuple(tasks), seed, include_path, limit, kv_cache,
                             protocol)
    text = plan.text
    start = time.perf_counter()
    hf_model, tokenizer, source = load_model(model, dtype_named(dtype), allow_pickle, trust_remote_code)
    load_time = time.perf_counter() - start
    path = source.path
    static = calibrated_scales(hf_model) is not None
    kv_cache = kv_cache or ("fp8" if static else None)  # what the runtime caches this checkpoint in by default
    if kv_cache is not None:
        use_kv_cache_format(hf_model, kv_cache)
    result = None
    if text is not None:
        with progress_bar(f"perplexity {text.corpus}", progress) as step:
            result = perplexity(hf_model, tokenizer, text, seqlen, max_tokens, batch_size, on_batch=step,
                                protocol=protocol)
    scores = {}
    for name, (task, items) in plan.offline.items():
        with progress_bar(f"{name} {text.corpus}", progress) as step:
            scores[name] = task.score(hf_model, tokenizer, items, text.corpus, batch_size, on_batch=step).to_dict()
    if plan.harness:
        scores.update(harness.run_tasks(hf_model, tokenizer, plan.harness, batch_size, plan.limit))
    return EvalResult(
        model=model,
        quantized=source.quantized,
        perplexity=None if result is None else result.perplexity,
        bits_per_byte=None if result is None else result.bits_per_byte,
        word_perplexity=None if result is None else result.word_perplexity,
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
        tasks=scores,
        kv_cache=None if kv_cache is None else kv_cache + (" static" if static and kv_cache == "fp8" else ""),
        protocol=protocol,
        perplexity_stderr=None if result is None else result.stderr,
    )
