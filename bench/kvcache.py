"""KV cache formats side by side on one W4 g64 checkpoint: perplexity at a long window (ratio to the bf16 cache),
the offline last-word task, cache bytes per token, decode tok/s at several context depths, and the longest
context whose cache fits in 1 GB.

Rows: bf16, int8, fp8 (dynamic scales per position), fp8 static (scales calibrated by ``lowbit quantize --kv-cache
fp8``), int4 (KIVI). Each measurement is one ``lowbit eval --kv-cache F`` or ``lowbit bench --kv-cache F --depth …`` in its own
process (printed with the table); speed is only comparable within one run on an otherwise idle machine, and the
CPU is printed with the table.

    python bench/kvcache.py --model smollm2-135m --out out/kvcache-smollm2
    python bench/kvcache.py --model gemma-3-270m --out out/kvcache-gemma --depths 512,2048,8192
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

FORMATS = ("bf16", "int8", "fp8", "fp8 static", "int4")
GIB = 1 << 30


def run_json(cmd: list) -> object:
    cmd = [sys.executable, "-m", "lowbit.cli.main", *map(str, cmd)]
    print("+", " ".join(cmd[2:]), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return json.loads(done.stdout)


def checkpoint(a, calibrated_cache: bool) -> Path:
    """The W4 g64 checkpoint the rows run (made once), or the same with calibrated static fp8 cache scales
    (``--kv-cache fp8 --calib``: the "fp8 static" row; RTN and GPTQ are deterministic, so its weights are the
    same). Every row compares cache formats on the same weights, so the weights' method only sets the baseline."""
    path = a.out / ("w4-g64-kv-fp8" if calibrated_cache else "w4-g64")
    calib = ["--calib", "shakespeare"] if calibrated_cache or a.method != "rtn" else []
    if not (path / "config.json").exists():
        run_json(["quantize", a.model, "-o", path, "--method", a.method, "--bits", "4", "--group-size", "64", *calib,
                  "--overwrite", "--json", *(["--kv-cache", "fp8"] if calibrated_cache else [])])
    return path


def depths(a, model: Path) -> str:
    """The asked depths, the deepest capped where it and the decoded tokens would pass the model's context."""
    limit = json.loads((model / "config.json").read_text()).get("max_position_embeddings") or 1 << 30
    return ",".join(str(min(int(d), limit - a.decode_tokens)) for d in a.depths.split(","))


def measure(a, fmt: str) -> dict:
    """One row: "fp8 static" is the calibrated checkpoint in its default cache, the others a --kv-cache format."""
    static = fmt == "fp8 static"
    model = checkpoint(a, static)
    cache = [] if static else ["--kv-cache", fmt]
    ev = run_json(["eval", model, *cache, "--ppl", a.ppl, "--seqlen", a.seqlen, "--max-tokens", a.max_tokens,
                   "--tasks", "lambada", "--limit", a.limit, "--json"])[0]
    speed = run_json(["bench", model, *cache, "--prompt-tokens", 64, "--decode-tokens", a.decode_tokens,
                      "--repeats", a.repeats, "--depth", depths(a, model), "--json"])
    return {"format": fmt, "eval": ev, "speed": speed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=Path("out/kvcache"))
    p.add_argument("--method", default="rtn", choices=("rtn", "gptq"), help="how the W4 g64 weights are rounded")
    p.add_argument("--ppl", default="austen")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--limit", type=int, default=200, help="lambada items")
    p.add_argument("--depths", default="512,2048,8192")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--formats", default=",".join(FORMATS))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = [measure(a, fmt) for fmt in a.formats.split(",")]
    (a.out / "kvcache.json").write_text(json.dumps(rows, indent=2))
    print_table(rows, a)


def print_table(rows: list[dict], a) -> None:
    base = next((r for r in rows if r["format"] == "bf16"), rows[0])
    cpu = base["speed"]["cpu"]
    depths = [d["depth"] for d in base["speed"]["depths"]]
    print(f"\n{a.model} W4 g64 {a.method.upper()}, held-out {a.ppl} ({base['eval']['eval_tokens']} tokens, seqlen {a.seqlen}),"
          f" lambada {a.limit} items; CPU {cpu['cpu']} (kernels {cpu['kernel_isa']}, compute {cpu['compute_dtype']},"
          f" {cpu['threads']} threads)")
    head = ["cache", "ppl", "x bf16", "lambada acc", "acc_last", "bytes/token", "x bf16",
            *(f"decode@{d}" for d in depths), "x bf16 @max", "context in 1 GB"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    bpt0 = base["speed"]["kv_cache_bytes_per_token"]
    for r in rows:
        e, s = r["eval"], r["speed"]
        lam = e["tasks"]["lambada"]
        bpt = s["kv_cache_bytes_per_token"]
        speeds = [d["decode_tok_s_median"] for d in s["depths"]]
        fits = int(GIB / bpt)
        cells = [r["format"], f"{e['perplexity']:.3f}", f"{e['perplexity'] / base['eval']['perplexity']:.4f}",
                 f"{lam['metrics']['acc']:.3f}±{lam['stderr']['acc']:.3f}",
                 f"{lam['metrics']['acc_last']:.3f}±{lam['stderr']['acc_last']:.3f}",
                 f"{bpt:,.0f}", f"{bpt / bpt0:.3f}", *(f"{v:.1f}" for v in speeds),
                 f"{speeds[-1] / base['speed']['depths'][-1]['decode_tok_s_median']:.2f}", f"{fits:,}"]
        print("| " + " | ".join(cells) + " |")
    print("decode: tok/s after a random prompt of that depth, median of the repeats; context in 1 GB: 2^30 / bytes"
          " per token (beyond the model's maximum context it is capacity, not a context the model supports)")
    for r in rows:
        print(f"  {r['format']}: decode step {r['speed']['kernels'].get('decode step')}")


if __name__ == "__main__":
    main()
