"""lowbit's GGUF files against llama.cpp's own, judged by llama.cpp: perplexity, size, bits per weight, decode speed.

Rows (each a GGUF file made once under ``--out`` and reused):
    llama.cpp Q4_0, Q4_K_M, Q3_K_M, Q2_K from the full-precision GGUF (``llama-quantize``), each without and with an
    importance matrix from ``llama-imatrix`` on lowbit's Shakespeare calibration windows (128 × 512 tokens);
    lowbit GPTQ → Q4_0, Q4_K_M, Q3_K_M, Q2_K, AWQ+GPTQ → Q4_K_M and GPTAQ → Q4_0 (``lowbit quantize --gguf``, same
    calibration).
Columns: ``llama-perplexity -c 512`` on held-out Persuasion (``--chunks`` windows) with its ±; lowbit's own evaluator
on the same file and windows (``lowbit eval --protocol llama.cpp``) and its difference; file size; bits per weight
of the decoder's matrices; ``llama-bench`` decode tokens/s (``-n 64``, median of ``-r``).

llama.cpp is not a dependency: pass the folder of its built tools (llama-quantize, llama-imatrix, llama-perplexity,
llama-bench) as ``--llama-cpp``. Speed is only comparable within one run on an otherwise idle machine; the CPU is
printed with the table.

    python bench/gguf_llama_cpp.py --model smollm2-135m --out out/gguf-smollm2 --llama-cpp ~/llama.cpp/build/bin
    python bench/gguf_llama_cpp.py --model gemma-3-270m --out out/gguf-gemma --llama-cpp ~/llama.cpp/build/bin --chunks 20
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from gguf import GGUFReader

from lowbit.data.corpora import calibration_text, evaluation_text
from lowbit.runtime.cpu import describe

LLAMA_TYPES = ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K")
LOWBIT_ROWS = (("gptq", "Q4_0"), ("gptq", "Q4_K_M"), ("gptq", "Q3_K_M"), ("gptq", "Q2_K"), ("awq+gptq", "Q4_K_M"),
               ("gptaq", "Q4_0"))


def sh(cmd: list, **kw) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return done


def lowbit(*args) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "lowbit.cli.main", *args])


def texts(a) -> tuple[Path, Path]:
    """The held-out evaluation text, and the calibration windows lowbit uses decoded to text (for llama-imatrix)."""
    from lowbit.calibration.sampling import CalibrationSpec
    from lowbit.models.loader import load_model

    held_out, calib = a.out / "persuasion.txt", a.out / "calibration.txt"
    if not held_out.exists():
        held_out.write_text(evaluation_text("austen").text)
    if not calib.exists():
        _, tokenizer, _ = load_model(a.model)
        windows = CalibrationSpec(calibration_text("shakespeare"), 128, 512, 0).windows(tokenizer)
        calib.write_text("".join(tokenizer.decode(w) for w in windows))
    return held_out, calib


def files(a, calib: Path) -> dict[str, Path]:
    """Every row's GGUF (those ``--rows`` names, and F32), made where missing."""
    tools = Path(a.llama_cpp)
    full = a.out / "f32.gguf"
    if not full.exists():
        lowbit("export", a.model, "-o", full, "--dense", "F32")
    imatrix = a.out / "imatrix.gguf"
    if not imatrix.exists():
        sh([tools / "llama-imatrix", "-m", full, "-f", calib, "-c", 512, "--chunks", 128, "-t", a.threads,
            "-o", imatrix])
    rows = {"F32": full}
    for kind in LLAMA_TYPES:
        for tag, extra in (("", []), (" + imatrix", ["--imatrix", imatrix])):
            path, label = a.out / f"llama-{kind}{'-imatrix' if extra else ''}.gguf", f"llama.cpp {kind}{tag}"
            if wanted(a, label) and not path.exists():
                sh([tools / "llama-quantize", *extra, full, path, kind, a.threads])
            rows[label] = path
    for method, kind in LOWBIT_ROWS:
        path, label = a.out / f"lowbit-{method}-{kind}.gguf", f"lowbit {method.upper()} → {kind}"
        if wanted(a, label) and not path.exists():
            lowbit("quantize", a.model, "-o", path, "--method", method, "--gguf", kind, "--calib", "shakespeare")
        rows[label] = path
    return {label: path for label, path in rows.items() if wanted(a, label)}


def wanted(a, label: str) -> bool:
    return not a.rows or label == "F32" or label in a.rows


def bits_per_weight(path: Path) -> float:
    """Bits per weight of the decoder's matrices (``blk.*`` tensors of two dimensions), as stored."""
    tensors = [t for t in GGUFReader(path).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def llama_perplexity(a, path: Path, text: Path) -> tuple[float, float]:
    done = sh([Path(a.llama_cpp) / "llama-perplexity", "-m", path, "-f", text, "-c", 512, "--chunks", a.chunks,
               "-t", a.threads])
    found = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", done.stdout + done.stderr)
    return float(found.group(1)), float(found.group(2))


def lowbit_perplexity(a, path: Path) -> float:
    done = lowbit("eval", path, "--ppl", "austen", "--protocol", "llama.cpp", "--max-tokens", 512 * a.chunks, "--json")
    return json.loads(done.stdout)[0]["perplexity"]


def decode_speed(a, path: Path) -> float:
    done = sh([Path(a.llama_cpp) / "llama-bench", "-m", path, "-p", 0, "-n", 64, "-t", a.threads, "-r", a.repeats,
               "-o", "json"])
    return statistics.median(json.loads(done.stdout)[0]["samples_ts"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--llama-cpp", required=True, help="folder of llama.cpp's built tools")
    p.add_argument("--chunks", type=int, default=60, help="llama-perplexity windows of 512 tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lowbit-eval", choices=("all", "lowbit"), default="all",
                   help="rows lowbit's evaluator measures too: all, or only F32 and lowbit's files")
    p.add_argument("--rows", default="", help="comma-separated row labels to make and measure (default: all; F32 always)")
    a = p.parse_args()
    a.rows = a.rows.split(",") if a.rows else []
    a.out.mkdir(parents=True, exist_ok=True)
    held_out, calib = texts(a)
    rows = files(a, calib)
    if a.rows:  # measured in the order named
        rows = dict(sorted(rows.items(), key=lambda kv: a.rows.index(kv[0]) if kv[0] in a.rows else -1))
    saved = a.out / "results.json"  # rows measured by earlier runs are kept, those measured now replaced
    earlier = {r["row"]: r for r in json.loads(saved.read_text())} if saved.exists() else {}
    cpu = describe()
    results = []
    for label, path in rows.items():
        if a.rows and label not in a.rows and label in earlier:  # F32, made for the rows named, measured before
            continue
        ppl, pm = llama_perplexity(a, path, held_out)
        mine = lowbit_perplexity(a, path) if a.lowbit_eval == "all" or not label.startswith("llama.cpp") else None
        results.append({"row": label, "file": str(path), "llama_perplexity": ppl, "llama_perplexity_pm": pm,
                        "lowbit_perplexity": mine, "size_bytes": path.stat().st_size,
                        "bits_per_weight": bits_per_weight(path), "decode_tok_s": decode_speed(a, path),
                        "cpu": cpu.get("cpu")})
        earlier[label] = results[-1]
        saved.write_text(json.dumps(list(earlier.values()), indent=1))
    results = list(earlier.values())
    print(f"{a.model}; llama-perplexity -c 512 --chunks {a.chunks} on held-out Persuasion; lowbit eval --protocol"
          f" llama.cpp on the same windows; llama-bench -n 64 -t {a.threads} -r {a.repeats}; CPU {cpu.get('cpu')}"
          f" (kernels {cpu.get('kernel_isa')})")
    print("| row | llama.cpp PPL | lowbit PPL | Δ | size MB | bits/weight | tg64 tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        mine = r["lowbit_perplexity"]
        lowbit_cols = "| | |" if mine is None else f"| {mine:.3f} | {100 * (mine / r['llama_perplexity'] - 1):+.2f}% |"
        print(f"| {r['row']} | {r['llama_perplexity']:.3f} ± {r['llama_perplexity_pm']:.3f} {lowbit_cols}"
              f" {r['size_bytes'] / 1e6:.2f} | {r['bits_per_weight']:.3f} | {r['decode_tok_s']:.1f} |")
    print(json.dumps({"model": a.model, "cpu": cpu, "rows": results}))


if __name__ == "__main__":
    main()
