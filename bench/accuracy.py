"""Accuracy benchmark: lowbit RTN/GPTQ vs full precision vs llama.cpp's quantizations, one evaluator.

Every row runs as its own process through the CLI, so wall time and peak RSS are the row's own.
llama.cpp rows need ``--llama-quantize PATH`` (built outside this repository); they are made
from the full-precision (F32) GGUF and scored by lowbit's evaluator after dequantization.

    python bench/accuracy.py --out bench/results [--llama-quantize ~/llama.cpp/build/bin/llama-quantize]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROWS = [  # (method, bits, group size (0 = per-channel), asym)
    ("rtn", 8, 0, False),
    ("gptq", 8, 0, False),
    ("rtn", 4, 64, False),
    ("gptq", 4, 64, False),
    ("rtn", 4, 128, False),
    ("gptq", 4, 128, False),
    ("rtn", 3, 64, False),
    ("gptq", 3, 64, False),
    ("rtn", 2, 32, True),
    ("gptq", 2, 32, True),
    ("rtn", 2, 32, False),
    ("gptq", 2, 32, False),
]
LLAMA_TYPES = ["Q8_0", "Q4_K_M", "Q4_0"]


def run_json(cmd: list[str]) -> dict | list:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return json.loads(done.stdout)


def lowbit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli.main", *args]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--ppl", default="austen")
    p.add_argument("--calib", default="shakespeare")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=16384, help="evaluation tokens per row")
    p.add_argument("--llama-quantize", type=Path, help="llama.cpp's llama-quantize binary (optional)")
    p.add_argument("--only", help="comma-separated row labels to run (default: all)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    evaluate = ["eval", "--ppl", a.ppl, "--seqlen", str(a.seqlen), "--max-tokens", str(a.max_tokens), "--json"]
    rows = []

    def add(label: str, model: str, quant: dict | None, note: str = "") -> None:
        result = run_json(lowbit(evaluate[0], model, *evaluate[1:]))[0]
        rows.append({"label": label, "note": note, "eval": result, "quantize": quant})
        (a.out / "accuracy.json").write_text(json.dumps(rows, indent=2))

    wanted = set(a.only.split(",")) if a.only else None
    add("full precision", a.model, None)
    for method, bits, group, asym in ROWS:
        label = f"{method} W{bits} {'per-channel' if not group else f'g{group}'}{' asym' if asym else ''}"
        if wanted and label not in wanted:
            continue
        out = a.out / label.replace(" ", "_")
        cmd = ["quantize", a.model, "-o", str(out), "--method", method, "--bits", str(bits)]
        cmd += ["--group-size", str(group), "--calib", a.calib, "--nsamples", str(a.nsamples)]
        cmd += ["--seqlen", str(a.seqlen), "--overwrite", "--json"] + (["--asym"] if asym else [])
        quant = run_json(lowbit(*cmd))
        note = "g32 sits on the Q4_1 source grid: flattering" if group == 32 else ""
        note = note or ("fallback: " + "; ".join(quant["fallbacks"])[:60] if quant["fallbacks"] else "")
        add(label, str(out), quant, note)
    if a.llama_quantize:
        from lowbit.models.embedded import EMBEDDED, embedded_gguf

        source = embedded_gguf(EMBEDDED[a.model])
        f32 = a.out / "llama-F32.gguf"
        subprocess.run([str(a.llama_quantize), "--allow-requantize", str(source), str(f32), "F32"], check=True,
                       capture_output=True)
        for qtype in LLAMA_TYPES:
            target = a.out / f"llama-{qtype}.gguf"
            t = time.perf_counter()
            subprocess.run([str(a.llama_quantize), str(f32), str(target), qtype], check=True, capture_output=True)
            quant = {"wall_time_s": time.perf_counter() - t, "size_bytes": target.stat().st_size,
                     "peak_rss_bytes": None, "bits_per_weight": None}
            add(f"llama.cpp {qtype}", str(target), quant, "K-quant sub-blocks of 32: flattering" if "K" in qtype else "")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    base = rows[0]["eval"]["perplexity"]
    header = f"{'row':<24}{'ppl':>9}{'x fp':>8}{'bits/w':>8}{'size MB':>9}{'quant s':>9}{'peak RSS GB':>12}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        e, q = r["eval"], r["quantize"] or {}
        bits = q.get("bits_per_weight") or e["bits_per_weight"]
        rss = q.get("peak_rss_bytes") or e["peak_rss_bytes"]
        qs = f"{q['wall_time_s']:.0f}" if q.get("wall_time_s") is not None else "-"
        print(f"{r['label']:<24}{e['perplexity']:>9.2f}{e['perplexity'] / base:>8.3f}{bits:>8.2f}"
              f"{e['size_bytes'] / 1e6:>9.1f}{qs:>9}{rss / 1e9:>12.2f}  {r['note']}")
    print(f"\nheld-out {rows[0]['eval']['corpus']}, {rows[0]['eval']['eval_tokens']} tokens, seqlen {rows[0]['eval']['seqlen']};"
          " bits/w of llama.cpp rows is lowbit's dequantized fp32 view (see size)")


if __name__ == "__main__":
    main()
