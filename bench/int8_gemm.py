"""The W8A8 matmul on this CPU: lowbit's int8 × int8 kernel against the dense GEMMs torch would run instead
(float32, bfloat16), lowbit's W8A16 GEMV, and ``torch._int_mm`` (oneDNN), on SmolLM2's and Gemma 3's
projection shapes, for a 512-token prompt and for decode (1 and 8 rows).

Every candidate runs in this one process, interleaved, best and median of the repeats. ``torch._int_mm``
is also checked for exactness against float64 sums (one report says it mismatches on AMD EPYC).

    python bench/int8_gemm.py [--repeats 7] [--json out/int8_gemm.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lowbit.runtime.cpu import describe
from lowbit.runtime.layout import pack
from lowbit.runtime.native import native_module
from lowbit.schemes import W8A16, quantize

# (model, projection, N, K)
SHAPES = [("smollm2", "qkv", 960, 576), ("smollm2", "gate_up", 3072, 576), ("smollm2", "down", 576, 1536),
          ("gemma3", "qkv", 1536, 640), ("gemma3", "gate_up", 4096, 640), ("gemma3", "down", 640, 2048)]
ROWS = (512, 8, 1)


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    native = native_module()
    cpu = describe()
    print(f"CPU {cpu['cpu']} (kernels {cpu['kernel_isa']}, torch {cpu['torch_cpu_capability']}, {cpu['threads']} threads)")
    header = (f"| {'shape':<22} | {'rows':>4} | {'fp32 GOP/s':>10} | {'bf16':>6} | {'int_mm':>6} | {'int_mm exact':>12} |"
              f" {'W8A16':>6} | {'W8A8 lowbit':>11} | {'W8A8 / best dense':>17} |")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    rows = []
    g = torch.Generator().manual_seed(0)
    for model, proj, N, K in SHAPES:
        w = torch.randn(N, K, generator=g)
        qw = quantize(w, W8A16(observer="minmax").weights, torch.float32)
        pw, panels, scale = pack(qw), native.int8_pack(qw.q), qw.scale.float().reshape(-1).contiguous()
        wb, qt = w.bfloat16(), qw.q.t()  # [K, N], column-major: the faster of the two layouts measured
        for M in ROWS:
            x = torch.randn(M, K, generator=g)
            xb, xq = x.bfloat16(), torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g)
            ops = 2 * M * N * K / 1e9
            best = {
                "fp32": timed(lambda: x @ w.t(), a.repeats),
                "bf16": timed(lambda: xb @ wb.t(), a.repeats),
                "int_mm": timed(lambda: torch._int_mm(xq, qt), a.repeats),
                "w8a8": timed(lambda: native.int8_gemm(x, panels, scale, K), a.repeats),
            }
            if M <= 8:
                best["w8a16"] = timed(lambda: native.gemv(x, pw.packed, pw.scale, pw.offset, 8, K), a.repeats)
            exact = bool(torch.equal(torch._int_mm(xq, qt).double(), xq.double() @ qw.q.double().t()))
            rate = {k: ops / v[0] for k, v in best.items()}
            dense = max(rate["fp32"], rate["bf16"])
            rows.append({"model": model, "projection": proj, "N": N, "K": K, "rows": M, "gop_s": rate,
                         "median_s": {k: v[1] for k, v in best.items()}, "int_mm_exact": exact, "cpu": cpu})
            w8a16 = f"{rate['w8a16']:>6.1f}" if "w8a16" in rate else f"{'-':>6}"
            print(f"| {model + ' ' + proj + f' {N}x{K}':<22} | {M:>4} | {rate['fp32']:>10.1f} | {rate['bf16']:>6.1f} |"
                  f" {rate['int_mm']:>6.1f} | {str(exact):>12} | {w8a16} | {rate['w8a8']:>11.1f} |"
                  f" {rate['w8a8'] / dense:>16.2f}x |")
    print("GOP/s: 2·M·N·K per second, best of the repeats (medians in the JSON); W8A8 lowbit includes quantizing"
          " the input; W8A16: lowbit's weight-only GEMV (decode rows only)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
