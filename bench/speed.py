"""Speed benchmark: lowbit's CPU inference vs llama.cpp and transformers, side by side in one run.

Rows: llama.cpp ``llama-bench`` at Q4_0 and Q8_0 (made from the full-precision GGUF), transformers
``generate`` in fp32 and bf16, and ``lowbit bench`` on RTN checkpoints W4 g32/g64/g128 (sym and
asym), W8 per channel, W3 g64 and W2 g32. Every row runs in its own process with the same thread
count. Decode is measured after the prompt, at the same context depth for every engine
(llama-bench ``-d``). Columns: prefill and decode tokens/s (median and best of the repeats), lowbit's
ratio to llama.cpp at the same bit-width, and the memory-bandwidth ceiling (bytes read per decoded
token against measured copy bandwidth) with the share of it reached. The detected CPU and the
kernel each layer kind ran are printed with the table.

``--isa avx2`` runs every row with the AVX2 path forced (``LOWBIT_ISA=avx2``, which also switches
torch's dispatch): pass a llama.cpp built for AVX2 (``-DGGML_NATIVE=OFF -DGGML_AVX2=ON
-DGGML_AVX512=OFF``) to compare like with like.

    python bench/speed.py --model smollm2-135m --llama-bench PATH/llama-bench --llama-quantize PATH/llama-quantize
    python bench/speed.py --isa avx2 --llama-bench AVX2-BUILD/llama-bench --llama-quantize PATH/llama-quantize
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# (bits, group size or None for per channel, symmetric)
LOWBIT_ROWS = [(4, 32, True), (4, 32, False), (4, 64, True), (4, 64, False), (4, 128, True), (4, 128, False),
               (8, None, True), (3, 64, True), (2, 32, True)]


def sh(cmd: list[str], env: dict | None = None) -> str:
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    done = subprocess.run(list(map(str, cmd)), stdout=subprocess.PIPE, text=True, env=env or ENV)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(map(str, cmd))}")
    return done.stdout


ENV = dict(os.environ)  # every row's environment (LOWBIT_ISA set by --isa)


def cell(value, width: int, spec: str, unit: float = 1.0) -> str:
    """A right-aligned table cell; "-" where the row has no such value (llama.cpp reports no RSS)."""
    return f"{'-':>{width}}" if value is None else f"{value / unit:>{width}{spec}}"


def lowbit(*args) -> list:
    return [sys.executable, "-m", "lowbit.cli.main", *args]


def copy_bandwidth_gbs(threads: int) -> float:
    """Best of 5 copies of a 256 MiB buffer: bytes read + written per second."""
    import torch

    torch.set_num_threads(threads)
    src = torch.empty(64 * 1024 * 1024, dtype=torch.float32).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def llama_rows(args, out: Path) -> list[dict]:
    from lowbit.models.embedded import EMBEDDED, embedded_gguf

    rows = []
    f32 = out / "llama-F32.gguf"
    if not f32.exists():
        sh([args.llama_quantize, "--allow-requantize", embedded_gguf(EMBEDDED[args.model]), f32, "F32"])
    for qtype in ("Q4_0", "Q8_0"):
        gguf = out / f"llama-{qtype}.gguf"
        if not gguf.exists():
            sh([args.llama_quantize, f32, gguf, qtype])
        # OpenMP threads spin between parallel regions, as both engines' defaults do (OMP_WAIT_POLICY=PASSIVE
        # makes the many small decode ops of either ~1.5–3x slower), so it is never set here.
        env = {k: v for k, v in ENV.items() if k != "OMP_WAIT_POLICY"}
        common = ["-m", gguf, "-t", args.threads, "-r", args.repeats, "-o", "json"]
        pp = json.loads(sh([args.llama_bench, *common, "-p", args.prompt, "-n", "0"], env))[0]
        tg = json.loads(sh([args.llama_bench, *common, "-p", "0", "-n", args.decode, "-d", args.prompt], env))[0]
        rows.append({"row": f"llama.cpp {qtype}", "bits": 4 if qtype == "Q4_0" else 8,
                     "prefill_median": statistics.median(pp["samples_ts"]), "prefill_best": max(pp["samples_ts"]),
                     "decode_median": statistics.median(tg["samples_ts"]), "decode_best": max(tg["samples_ts"]),
                     "size_bytes": gguf.stat().st_size})
    return rows


TRANSFORMERS = """
import json, statistics, sys, time, torch
from lowbit.models.loader import load_model
dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[sys.argv[1]]
P, D, R = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
model, tok, _ = load_model(sys.argv[6], dtype)
ids = torch.randint(0, tok.vocab_size, (1, P), generator=torch.Generator().manual_seed(0))
pre, dec = [], []
with torch.no_grad():
    model(ids[:, :16])
    for _ in range(R):
        t = time.perf_counter(); model(ids); pre.append(P / (time.perf_counter() - t))
        # decode = the difference of a D-token and a 1-token generate (both include the same prompt pass)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        first = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=D, min_new_tokens=D, do_sample=False)
        rest = time.perf_counter() - t - first
        if rest <= 0:
            raise SystemExit(f"decode time not measurable: {D} tokens took no longer than 1")
        dec.append((D - 1) / rest)
print(json.dumps({"prefill_median": statistics.median(pre), "prefill_best": max(pre),
                  "decode_median": statistics.median(dec), "decode_best": max(dec)}))
"""


def transformers_rows(args) -> list[dict]:
    rows = []
    for dtype in ("float32", "bfloat16"):
        raw = json.loads(sh([sys.executable, "-c", TRANSFORMERS, dtype, args.prompt, args.decode, args.repeats,
                             args.threads, args.model]))
        rows.append({"row": f"transformers {dtype}", "bits": 32 if dtype == "float32" else 16, **raw})
    return rows


def lowbit_rows(args, out: Path) -> list[dict]:
    rows = []
    for bits, group, sym in LOWBIT_ROWS:
        name = f"w{bits}" + (f"-g{group}" if group else "") + ("" if sym else "-asym")
        ckpt = out / name
        if not (ckpt / "config.json").exists():
            sh(lowbit("quantize", args.model, "-o", ckpt, "--method", "rtn", "--bits", bits, "--group-size", group or 0,
                      *([] if sym else ["--asym"]), "--overwrite", "--json"))
        raw = json.loads(sh(lowbit("bench", ckpt, "--json", "--threads", args.threads, "--repeats", args.repeats,
                                   "--prompt-tokens", args.prompt, "--decode-tokens", args.decode)))
        label = f"lowbit W{bits}" + (f" g{group}" if group else " per-channel") + ("" if sym else " asym")
        rows.append({"row": label, "bits": bits, "prefill_median": raw["prefill_tok_s_median"],
                     "prefill_best": raw["prefill_tok_s_max"], "decode_median": raw["decode_tok_s_median"],
                     "decode_best": raw["decode_tok_s_max"], "size_bytes": raw["size_bytes"],
                     "bytes_per_token": raw["resident_weights_bytes"], "kv_cache_bytes": raw["kv_cache_bytes"],
                     "rss_after_load": raw["rss_after_load_bytes"], "rss_before_load": raw["rss_before_load_bytes"],
                     "kernels": raw["kernels"], "notices": raw["notices"], "cpu": raw["cpu"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--isa", choices=("native", "avx2"), default="native", help="force lowbit's and torch's AVX2 path")
    p.add_argument("--llama-bench", type=Path)
    p.add_argument("--llama-quantize", type=Path)
    p.add_argument("--out", type=Path, default=Path("bench/results/speed"))
    p.add_argument("--threads", default="2")
    p.add_argument("--prompt", default="512")
    p.add_argument("--decode", default="128")
    p.add_argument("--repeats", default="3")
    args = p.parse_args()
    if args.isa != "native":
        ENV["LOWBIT_ISA"] = args.isa
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = json.loads(sh(lowbit("env", "--json")))
    bandwidth = copy_bandwidth_gbs(int(args.threads))
    rows = (llama_rows(args, args.out) if args.llama_bench and args.llama_quantize else [])
    rows += transformers_rows(args) + lowbit_rows(args, args.out)
    reference = {r["bits"]: r for r in rows if r["row"].startswith("llama.cpp")}
    reference[3] = reference[2] = reference.get(4)  # low-bit rows are compared with Q4_0
    for r in rows:
        ref = reference.get(r["bits"]) if r["row"].startswith("lowbit") else None
        r["decode_vs_llama"] = r["decode_median"] / ref["decode_median"] if ref else None
        r["prefill_vs_llama"] = r["prefill_median"] / ref["prefill_median"] if ref else None
        if r.get("bytes_per_token"):
            r["ceiling_tok_s"] = bandwidth * 1e9 / r["bytes_per_token"]
            r["ceiling_pct"] = 100 * r["decode_median"] / r["ceiling_tok_s"]
    (args.out / "speed.json").write_text(json.dumps({"copy_bandwidth_gbs": bandwidth, "threads": args.threads,
                                                      "model": args.model, "isa": args.isa, "cpu": cpu,
                                                      "rows": rows}, indent=2))
    have = " ".join(k for k, v in cpu["features"].items() if v)
    print(f"\nCPU: {cpu['cpu']} ({have}); lowbit kernels {cpu['kernel_isa']}"
          f"{' (forced: LOWBIT_ISA=' + args.isa + ')' if args.isa != 'native' else ''}, compute {cpu['compute_dtype']},"
          f" torch capability {cpu['torch_cpu_capability']}")
    print(f"{args.model}, {args.threads} threads, prompt {args.prompt}, decode {args.decode} after it,"
          f" {args.repeats} repeats;"
          f" copy bandwidth {bandwidth:.1f} GB/s (read+write)")
    header = (f"{'row':<32}{'prefill tok/s':>16}{'decode tok/s':>16}{'vs llama.cpp (pre/dec)':>24}"
              f"{'MB/token':>10}{'ceiling tok/s':>15}{'% ceil':>8}{'RSS-base MB':>13}{'disk MB':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        vs = (f"{r['prefill_vs_llama']:.2f}x / {r['decode_vs_llama']:.2f}x" if r.get("decode_vs_llama") else "-")
        rss = r["rss_after_load"] - r["rss_before_load"] if r.get("rss_after_load") else None
        print(f"{r['row']:<32}{r['prefill_median']:>8.0f} ({r['prefill_best']:>4.0f}){r['decode_median']:>9.1f} "
              f"({r['decode_best']:>4.0f}){vs:>24}"
              f"{cell(r.get('bytes_per_token'), 10, '.1f', 1e6)}{cell(r.get('ceiling_tok_s'), 15, '.0f')}"
              f"{cell(r.get('ceiling_pct'), 8, '.0f')}{cell(rss, 13, '.0f', 1e6)}{cell(r.get('size_bytes'), 9, '.1f', 1e6)}")
    print("median (best); MB/token = resident weights read per decoded token; RSS-base = RSS after load"
          " minus before (includes the KV cache); W3/W2 compared with Q4_0")
    print("\nkernels per row:")
    for r in rows:
        if r.get("kernels"):
            kinds = "; ".join(f"{k}: {v}" for k, v in r["kernels"].items() if k not in ("kernel ISA", "compute dtype"))
            print(f"  {r['row']}: {kinds}")
            for line in r["notices"]:
                print(f"    {line}")


if __name__ == "__main__":
    main()
