"""Quantized activations side by side: W8A8 without and with SmoothQuant (α = 0.5, and tuned per layer),
RTN and GPTQ weights, static per-tensor input scales, W4A8, FP8 dynamic and static, against full precision
and weight-only W8A16, on one model and one held-out text.

Every row is one ``lowbit quantize`` command (printed with the table) followed by ``lowbit eval`` (perplexity
and the offline last-word task: acc and acc_last with standard errors) and ``lowbit bench`` (prefill and
decode tokens/s, median of its repeats), each in its own process, so no row's memory or threads leak into
another's. Speed is only comparable within one run on an otherwise idle machine: the CPU is printed with
the table. The SmoothQuant auto rows list the α each smoothing group got (from the checkpoint's record).

    python bench/activations.py --model smollm2-135m --out bench/results/activations-smollm2
    python bench/activations.py --model gemma-3-270m --out bench/results/activations-gemma --keep
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

# label → quantize arguments after the model (None: the model as it is)
ROWS: list[tuple[str, list | None]] = [
    ("full precision", None),
    ("W8A16 rtn", ["--scheme", "W8A16", "--method", "rtn"]),
    ("W8A8 rtn", ["--scheme", "W8A8", "--method", "rtn"]),
    ("W8A8 gptq", ["--scheme", "W8A8", "--method", "gptq"]),
    ("W8A8 SQ 0.5 rtn", ["--scheme", "W8A8", "--method", "rtn", "--smoothquant", "0.5"]),
    ("W8A8 SQ 0.5 gptq", ["--scheme", "W8A8", "--method", "gptq", "--smoothquant", "0.5"]),
    ("W8A8 SQ auto rtn", ["--scheme", "W8A8", "--method", "rtn", "--smoothquant", "auto"]),
    ("W8A8 SQ auto gptq", ["--scheme", "W8A8", "--method", "gptq", "--smoothquant", "auto"]),
    ("W8A8 static gptq", ["--scheme", "W8A8_STATIC", "--method", "gptq"]),
    ("W8A8 static SQ auto gptq", ["--scheme", "W8A8_STATIC", "--method", "gptq", "--smoothquant", "auto"]),
    ("W4A8 g64 SQ auto gptq", ["--scheme", "W4A8", "--group-size", "64", "--method", "gptq", "--smoothquant", "auto"]),
    ("FP8 dynamic", ["--scheme", "FP8_DYNAMIC"]),
    ("FP8 static", ["--scheme", "FP8"]),
]
NEEDS_DATA = ("gptq", "--smoothquant", "W8A8_STATIC", "FP8")  # rows that take --calib


def run_json(cmd: list) -> object:
    cmd = list(map(str, cmd))
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return json.loads(done.stdout)


def lowbit(*args) -> list:
    return [sys.executable, "-m", "lowbit.cli.main", *args]


def quantize_args(a, args: list) -> list:
    calib = ["--calib", a.calib, "--nsamples", a.nsamples, "--seqlen", a.seqlen]
    needs = any(token in args for token in NEEDS_DATA)
    return [*args, *(calib if needs else []), "--overwrite", "--json"]


def alpha_counts(folder: Path) -> dict[str, int]:
    """How many smoothing groups got each α ("none": left unsmoothed)."""
    record = json.loads((folder / "lowbit_recipe.json").read_text())
    alphas = record.get("smoothquant_alpha") or {}
    return dict(sorted(Counter("none" if v is None else f"{v:.1f}" for v in alphas.values()).items()))


def bench(a, model: str) -> dict:
    return run_json(lowbit("bench", model, "--prompt-tokens", a.prompt_tokens, "--decode-tokens", a.decode_tokens,
                           "--json"))


def measure(a, label: str, args: list | None) -> dict:
    model = a.model
    command, quant = None, None
    if args is not None:
        out = a.out / label.replace(" ", "_")
        quant = run_json(lowbit("quantize", a.model, "-o", out, *quantize_args(a, args)))
        command = " ".join(map(str, ["lowbit", "quantize", a.model, "-o", out, *quantize_args(a, args)[:-1]]))
        model = str(out)
    ev = run_json(lowbit("eval", model, "--ppl", a.ppl, "--max-tokens", a.max_tokens, "--tasks", "lambada",
                         "--limit", a.limit, "--json"))[0]
    speed = bench(a, model)
    row = {"label": label, "command": command, "eval": ev, "quantize": quant, "speed": speed}
    if args is not None and "--smoothquant" in args:
        row["alpha_counts"] = alpha_counts(Path(model))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=Path("bench/results/activations"))
    p.add_argument("--ppl", default="austen")
    p.add_argument("--calib", default="shakespeare")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens scored per row")
    p.add_argument("--limit", type=int, default=200, help="lambada items per row")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--only", help="comma-separated row labels to run (default: all)")
    p.add_argument("--speed-only", action="store_true", help="for the --only rows already in OUT/activations.json,"
                   " measure speed again (their checkpoints are kept) and nothing else")
    p.add_argument("--keep", action="store_true", help="keep the rows already in OUT/activations.json (those --only"
                   " names are measured again)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results = a.out / "activations.json"
    kept = {r["label"]: r for r in json.loads(results.read_text())} if a.keep and results.exists() else {}
    wanted = set(a.only.split(",")) if a.only else None
    rows = []
    for label, args in ROWS:
        if label in kept and a.speed_only and wanted is not None and label in wanted:
            model = a.model if kept[label]["command"] is None else str(a.out / label.replace(" ", "_"))
            rows.append({**kept[label], "speed": bench(a, model)})
        elif label in kept and (wanted is None or label not in wanted):
            rows.append(kept[label])
        elif wanted is None or label in wanted:
            rows.append(measure(a, label, args))
        results.write_text(json.dumps(rows + [r for k, r in kept.items() if k not in {x["label"] for x in rows}],
                                      indent=2))
    print_table(rows, a)


def print_table(rows: list[dict], a) -> None:
    fp = next((r["eval"]["perplexity"] for r in rows if r["label"] == "full precision"), None)
    speed = {r["label"]: r["speed"] for r in rows}
    cpu = next(iter(speed.values()))["cpu"] if speed else {}
    isa = cpu.get("kernel_isa", "?")
    print(f"\n{a.model}, held-out {a.ppl} ({rows[0]['eval']['eval_tokens']} tokens, seqlen 512), lambada"
          f" {a.limit} items; calibration {a.calib} {a.nsamples}x{a.seqlen}; CPU {cpu.get('cpu', '?')}"
          f" (kernels {isa}, compute {cpu.get('compute_dtype', '?')}, {cpu.get('threads', '?')} threads)")
    header = (f"| {'row':<26} | {'ppl':>7} | {'x fp':>6} | {'lambada acc':>13} | {'acc_last':>13} | {'size MB':>7} |"
              f" {'prefill tok/s':>13} | {'decode tok/s':>12} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        e, s = r["eval"], r["speed"]
        lam = e["tasks"]["lambada"]
        acc = f"{lam['metrics']['acc']:.3f}±{lam['stderr']['acc']:.3f}"
        last = f"{lam['metrics']['acc_last']:.3f}±{lam['stderr']['acc_last']:.3f}"
        ratio = e["perplexity"] / fp if fp else float("nan")
        print(f"| {r['label']:<26} | {e['perplexity']:>7.2f} | {ratio:>6.3f} | {acc:>13} | {last:>13} |"
              f" {(e['size_bytes'] or 0) / 1e6:>7.1f} | {s['prefill_tok_s_median']:>13.1f} | {s['decode_tok_s_median']:>12.1f} |")
    print("size: the checkpoint on disk (the full-precision row: the model as shipped); tok/s: lowbit bench,"
          f" {a.prompt_tokens}-token prompt then {a.decode_tokens} tokens, median of 3")
    for r in rows:
        if "alpha_counts" in r:
            print(f"  α per smoothing group, {r['label']}: {r['alpha_counts']}")
    for r in rows:
        kernels = r["speed"].get("kernels", {})
        print(f"  {r['label']}: {r['command'] or 'lowbit eval ' + a.model}; down_proj runs {kernels.get('down_proj')}")


if __name__ == "__main__":
    main()
