"""Weight-compression methods side by side: RTN, HQQ, NF4, FP4, AWQ, GPTQ, AWQ+GPTQ, ternary, and a
``ratio`` sweep of mixed 4/8-bit, on one model and one held-out text.

Every row is one ``lowbit quantize`` / ``lowbit compress`` command (printed with the row) followed by
``lowbit eval``, each in its own process. W2 g32 runs for the two best methods at W3. AWQ and GPTQ
also run on the asymmetric W4 grid (AutoAWQ's default) so they compare on the same grid. Embeddings
stay in full precision except in the ``ratio`` rows, where ``compress`` keeps them (and the tied
head) in int8 as NNCF does.

    python bench/methods.py --out bench/results/methods [--model smollm2-135m] [--group 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def run_json(cmd: list[str]):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return json.loads(done.stdout)


def lowbit(*args) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli.main", *map(str, args)]


def method_rows(a, bits: int, group: int, methods: list[str]) -> list[tuple[str, list]]:
    """(label, CLI arguments after the model) for each method at one bit-width."""
    calib = ["--calib", a.calib, "--nsamples", a.nsamples, "--seqlen", a.seqlen]
    rows = []
    for spec in methods:
        m, _, variant = spec.partition(" ")  # "awq asym": the grid AutoAWQ uses by default, for a like-for-like pair
        asym = ["--asym"] if variant == "asym" else []
        label = f"{m} W{bits} g{group}"
        if m in ("nf4", "fp4"):
            # embeddings kept in full precision, as in the quantize rows (compress makes them int8 by default)
            rows.append((label.replace(f"W{bits} ", ""), ["compress", "--mode", m, "--group-size", group,
                                                          "--ignore", "model.embed_tokens"]))
        elif m == "hqq":
            rows.append((label + " asym", ["quantize", "--method", "hqq", "--bits", bits, "--group-size", group, "--asym"]))
        elif m == "rtn":
            rows.append((label, ["quantize", "--method", "rtn", "--bits", bits, "--group-size", group]))
        else:
            rows.append((label + (" asym" if asym else ""),
                         ["quantize", "--method", m, "--bits", bits, "--group-size", group, *asym, *calib]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--group", type=int, default=64, help="group size of the W4/W3 rows (128 for gemma-3-270m)")
    p.add_argument("--out", type=Path, default=Path("bench/results/methods"))
    p.add_argument("--ppl", default="austen")
    p.add_argument("--calib", default="shakespeare")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=16384, help="evaluation tokens per row")
    p.add_argument("--only", help="comma-separated row labels to run (default: all)")
    p.add_argument("--keep", action="store_true", help="keep the rows already in OUT/methods.json, run the others")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    wanted = set(a.only.split(",")) if a.only else None
    results_file = a.out / "methods.json"
    kept = {r["label"]: r for r in json.loads(results_file.read_text())} if a.keep and results_file.exists() else {}
    rows: list[dict] = []

    def evaluate(label: str, model: str, command: list, quant: dict | None) -> dict:
        if label in kept:
            rows.append(kept[label])
            return kept[label]
        result = run_json(lowbit("eval", model, "--ppl", a.ppl, "--seqlen", a.seqlen, "--max-tokens", a.max_tokens,
                                 "--json"))[0]
        row = {"label": label, "command": " ".join(map(str, command)), "eval": result, "quantize": quant}
        rows.append(row)
        done = {r["label"] for r in rows}
        results_file.write_text(json.dumps(rows + [r for k, r in kept.items() if k not in done], indent=2))
        return row

    def run_row(label: str, args: list) -> dict | None:
        if wanted and label not in wanted:
            return None
        if label in kept:
            rows.append(kept[label])
            return kept[label]
        out = a.out / label.replace(" ", "_").replace("+", "-")
        command = ["lowbit", args[0], a.model, "-o", out, *args[1:], "--overwrite"]
        quant = run_json(lowbit(*command[1:], "--json"))
        return evaluate(label, str(out), command, quant)

    evaluate("full precision", a.model, ["lowbit", "eval", a.model], None)
    w4 = method_rows(a, 4, a.group, ["rtn", "hqq", "nf4", "fp4", "awq", "gptq", "awq+gptq", "awq asym", "gptq asym"])
    w3 = method_rows(a, 3, a.group, ["rtn", "hqq", "awq", "gptq", "awq+gptq"])
    for label, args in w4 + w3:
        run_row(label, args)
    w3_done = [r for r in rows if " W3 " in r["label"]]
    best = [r["label"].split()[0] for r in sorted(w3_done, key=lambda r: r["eval"]["perplexity"])[:2]]
    for label, args in method_rows(a, 2, 32, best or ["gptq", "awq+gptq"]):
        run_row(label, args)
    run_row(f"ternary g{a.group}", ["quantize", "--method", "ternary", "--bits", 2, "--group-size", a.group])
    sweeps = [("data-free", []),  # NNCF's weight_error, seconds
              ("data-free fisher", ["--sensitivity", "fisher"]),  # on text the model samples itself
              ("data-aware", ["--dataset", a.calib, "--nsamples", 32])]  # fisher on calibration text
    for kind, extra in sweeps:
        for ratio in (1.0, 0.9, 0.8, 0.6):
            if extra and ratio == 1.0:
                continue  # identical to the data-free ratio 1.0 row: nothing to rank
            args = ["compress", "--mode", "int4_sym", "--group-size", a.group, "--ratio", ratio, *extra]
            run_row(f"int4_sym g{a.group} ratio {ratio} {kind}", args)
    print_table(rows, a)


def print_table(rows: list[dict], a) -> None:
    fp = next((r["eval"]["perplexity"] for r in rows if r["label"] == "full precision"), None)
    header = f"{'row':<40}{'ppl':>9}{'x fp':>8}{'bits/w':>8}{'size MB':>9}{'wall s':>8}"
    print(f"\n{a.model}, held-out {a.ppl}, {rows[0]['eval']['eval_tokens']} tokens, seqlen {a.seqlen};"
          f" calibration {a.calib} {a.nsamples}x{a.seqlen}")
    print(header)
    print("-" * len(header))
    for r in rows:
        e, q = r["eval"], r["quantize"] or {}
        ratio = e["perplexity"] / fp if fp else float("nan")
        wall = q.get("wall_time_s")
        big = e["perplexity"] >= 1e5
        ppl, x = (f"{e['perplexity']:.2e}", f"{ratio:.1e}") if big else (f"{e['perplexity']:.2f}", f"{ratio:.3f}")
        print(f"{r['label']:<40}{ppl:>9}{x:>8}{e['bits_per_weight']:>8.2f}"
              f"{(e['size_bytes'] or 0) / 1e6:>9.1f}{(f'{wall:.0f}' if wall else '-'):>8}")
    print("bits/w: stored bits per decoder-linear weight incl. scales; wall s: quantize/compress command")
    for r in rows:
        print(f"  {r['label']}: {r['command']}")


if __name__ == "__main__":
    main()
