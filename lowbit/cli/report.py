"""Tables for the terminal and JSON for machines."""

from __future__ import annotations

import json
import sys
from typing import Iterable

from rich.console import Console
from rich.table import Table

from lowbit.evaluation.tasks import plus_minus


def mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def emit_json(payload) -> None:
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")


def quantize_table(result: dict) -> Table:
    table = Table(title="lowbit quantize", show_header=False)
    rows = [
        ("output", result["output_dir"] or "-"),
        ("method", result["method"]),
        ("scheme", result["scheme"]),
        ("layers quantized", str(result["layers"])),
        ("bits / weight (decoder linears)", f"{result['bits_per_weight']:.3f}"),
        ("size on disk", mb(result["size_bytes"])),
        ("wall time", f"{result['wall_time_s']:.1f} s"),
        ("peak RSS", gb(result["peak_rss_bytes"])),
    ]
    for key, value in rows:
        table.add_row(key, value)
    for fallback in result["fallbacks"]:
        table.add_row("group-size fallback", fallback)
    for note in result["notes"]:
        table.add_row("note", note)
    return table


def distribution_table(result: dict) -> Table:
    """Bit-width distribution of a mixed-precision result: share of parameters and of layers per scheme."""
    table = Table(title="bit-width distribution")
    for column in ("scheme", "% of all parameters", "% of ratio-defining", "% of layers", "layers"):
        table.add_column(column, justify="left" if column == "scheme" else "right")
    for row in result["distribution"]:
        table.add_row(row["scheme"], f"{row['parameters_pct']:.1f}", f"{row['ratio_defining_pct']:.1f}",
                      f"{row['layers_pct']:.1f}", str(row["layers"]))
    return table


def eval_table(results: Iterable[dict]) -> Table:
    results = list(results)
    base = next((r["perplexity"] for r in results if r["perplexity"] is not None), None)
    metrics = sorted({(task, m) for r in results for task, t in r.get("tasks", {}).items() for m in t["metrics"]})
    protocol = ", llama-perplexity's protocol" if results[0].get("protocol") == "llama.cpp" else ""
    table = Table(title=f"lowbit eval ({results[0]['corpus'] or 'no text'}, held-out, seqlen {results[0]['seqlen']}"
                        f"{protocol})")
    columns = ["model", "perplexity", "vs first", "bits/byte", "word ppl", *(f"{t} {m}" for t, m in metrics),
               "bits/weight", "size", "tokens", "load s", "eval s", "peak RSS"]
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in results:
        ppl = r["perplexity"]
        table.add_row(
            r["model"] + (f" (KV cache {r['kv_cache']})" if r.get("kv_cache") else ""),
            "-" if ppl is None else f"{ppl:.2f}" + ("" if r.get("perplexity_stderr") is None
                                                     else f" ± {r['perplexity_stderr']:.2f}"),
            "-" if ppl is None or not base else f"{ppl / base:.3f}x",
            "-" if r.get("bits_per_byte") is None else f"{r['bits_per_byte']:.4f}",
            "-" if r.get("word_perplexity") is None else f"{r['word_perplexity']:.2f}",
            *(accuracy(r.get("tasks", {}).get(t), m) for t, m in metrics),
            f"{r['bits_per_weight']:.2f}",
            mb(r["size_bytes"]),
            "-" if r["eval_tokens"] is None else f"{r['eval_tokens']:,}",
            f"{r['load_time_s']:.1f}",
            f"{r['eval_time_s']:.1f}",
            gb(r["peak_rss_bytes"]),
        )
    return table


def accuracy(task: dict | None, metric: str) -> str:
    """"0.412 ± 0.025 (n=400)": a task's accuracy with its standard error and item count."""
    if not task:
        return "-"
    return f"{plus_minus(task['metrics'][metric], task['stderr'][metric])} (n={task['items']})"


def speed_table(r: dict) -> Table:
    table = Table(title=f"lowbit bench {r['model']} ({r['decoder']}, {r['threads']} threads)", show_header=False)
    rows = [
        ("quantization", r["quantization"] or "none (bf16)"),
        ("load time", f"{r['load_time_s']:.1f} s"),
        ("size on disk", mb(r["size_bytes"])),
        ("resident weights", mb(r["resident_weights_bytes"])),
        ("KV cache", mb(r["kv_cache_bytes"]) + ("" if r.get("kv_cache_bytes_per_token") is None
                                                else f" ({r['kv_cache_bytes_per_token']:,.0f} bytes per token)")),
        ("RSS after load (before)", f"{mb(r['rss_after_load_bytes'])} ({mb(r['rss_before_load_bytes'])})"),
        ("peak RSS: load, run", f"{gb(r['load_peak_rss_bytes'])}, {gb(r['run_peak_rss_bytes'])}"
         + ("" if r["run_peak_exact"] else " (the run's includes the load's: no peak reset here)")),
        ("peak RSS", gb(r["peak_rss_bytes"])),
        ("model's peak (peak - runtime)", mb(r["model_peak_bytes"])),
        ("peak explained", ", ".join(f"{k.replace('_', ' ')} {mb(v)}" for k, v in r["memory_parts"].items())),
        (f"prefill {r['prompt_tokens']} tok/s, median (best)", f"{r['prefill_tok_s_median']:.0f} ({r['prefill_tok_s_max']:.0f})"),
        (f"decode {r['decode_tokens']} tok/s, median (best)", f"{r['decode_tok_s_median']:.1f} ({r['decode_tok_s_max']:.1f})"),
        *((f"decode at depth {d['depth']} tok/s, median (best)",
           f"{d['decode_tok_s_median']:.1f} ({d['decode_tok_s_max']:.1f})") for d in r.get("depths", [])),
        ("cpu", cpu_line(r["cpu"])),
        *((f"kernel: {kind}", kernel) for kind, kernel in r["kernels"].items()),
        *(("notice", line) for line in r["notices"]),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def cpu_line(c: dict) -> str:
    """The CPU, its features and what lowbit chose, in one line."""
    have = " ".join(name for name, present in c["features"].items() if present) or "none of note"
    forced = f", forced by LOWBIT_ISA={c['forced_isa']}" if c["forced_isa"] else ""
    return (f"{c['cpu']} ({c['machine']}; {have}); kernels {c['kernel_isa']}{forced}, compute {c['compute_dtype']},"
            f" torch capability {c['torch_cpu_capability']}, {c['threads']} threads")


def env_table(c: dict, build: dict, kernels: dict | None) -> Table:
    table = Table(title="lowbit env", show_header=False)
    table.add_row("cpu", f"{c['cpu']} ({c['machine']})")
    table.add_row("features", " ".join(f"{k}{'' if v else ' (no)'}" for k, v in c["features"].items()) or "-")
    table.add_row("native kernel level", c["native_isa"])
    table.add_row("kernel level used", c["kernel_isa"] + (f" (LOWBIT_ISA={c['forced_isa']})" if c["forced_isa"] else ""))
    table.add_row("compute dtype", c["compute_dtype"])
    table.add_row("torch CPU capability", c["torch_cpu_capability"])
    table.add_row("threads", str(c["threads"]))
    for key, value in build.items():
        table.add_row(key, value)
    for kind, kernel in (kernels or {}).items():
        table.add_row(f"kernel: {kind}", kernel)
    return table


def print_table(table: Table) -> None:
    """Print to the terminal at its width; piped output gets a wide console so columns never fold."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)
