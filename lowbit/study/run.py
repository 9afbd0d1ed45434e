"""Run a study row by row: quantize (cached), evaluate, benchmark; each step a ``lowbit`` command in its
own process, so that every row's peak memory is its own and every figure can be reproduced by the
command the report prints. A finished row is kept in ``rows/NAME.json`` and reused while its key holds.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Callable, Optional

from lowbit.child import run_lowbit
from lowbit.errors import LowbitError
from lowbit.formats.compressed_tensors import read_record
from lowbit.study.plan import Row, StudyPlan


def command(step: str, target: str, argv: list[str]) -> list[str]:
    """The ``lowbit`` command line of one step, as a user would type it."""
    return ["lowbit", step, target, *argv, "--json"]


def _run(cmd: list[str], log: Path) -> dict:
    """Run a lowbit command in a fresh interpreter; its JSON result, or an error with its last message."""
    with open(log, "a") as err:
        err.write(f"$ {shlex.join(cmd)}\n")
        err.flush()
        status, result = run_lowbit(cmd[1:], stderr=err)
    if status != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        raise LowbitError(f"{shlex.join(cmd)} failed: {lines[-1] if lines else 'no message'}")
    return result[0] if isinstance(result, list) else result


def checkpoint_matches(row: Row) -> bool:
    """Whether the row's checkpoint folder holds exactly what its quantize command would write."""
    folder = row.checkpoint
    if folder is None or not (folder / "config.json").is_file():
        return False
    record, plan = read_record(folder), row.plan
    weights, calib = record.get("weights") or {}, record.get("calibration") or {}
    return (record.get("source_model") == row.model and record.get("method") == plan.method
            and weights.get("num_bits") == row.bits and (weights.get("group_size") or 0) == plan.group_size
            and weights.get("symmetric", True) and calib.get("corpus") == plan.calib
            and calib.get("nsamples") == plan.nsamples and calib.get("seqlen") == plan.seqlen
            and calib.get("seed") == plan.seed)


def cached_row(row: Row) -> Optional[dict]:
    try:
        result = json.loads(row.result_file.read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("key") == row.key and "error" not in result else None


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(payload, indent=2))
    partial.replace(path)


def run_row(row: Row, say: Callable[[str], None]) -> dict:
    """The row's measurements (quantizing first unless its checkpoint is already there)."""
    plan = row.plan
    log = row.result_file.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    commands, quantized, quantize_s = [], None, 0.0
    if row.checkpoint is not None:
        quantize = command("quantize", row.model, ["-o", str(row.checkpoint), *plan.quantize_argv(row.bits)])
        commands.append(shlex.join(quantize))
        if checkpoint_matches(row):
            say(f"{row.label}: checkpoint {row.checkpoint} already made by this recipe, reused")
            quantized = {"cached": True, **read_record(row.checkpoint)}
            quantize_s = float(quantized.get("quantization_wall_time_s") or 0.0)  # as long as it took when made
        else:
            say(f"{row.label}: quantizing ({plan.method}, {row.bits} bits, group {plan.group_size})")
            start = time.perf_counter()
            quantized = {"cached": False, **_run(quantize + ["--overwrite"], log)}
            quantize_s = time.perf_counter() - start
    evaluate = command("eval", row.runs, plan.eval_argv())
    bench = command("bench", row.runs, plan.bench_argv())
    commands += [shlex.join(evaluate), shlex.join(bench)]
    say(f"{row.label}: evaluating ({plan.ppl}: bits per byte, {', '.join(plan.tasks) or 'no tasks'})")
    start = time.perf_counter()
    evaluated = _run(evaluate, log)
    eval_s = time.perf_counter() - start
    say(f"{row.label}: running it (512-token prompt, 256 generated tokens) for memory and speed")
    start = time.perf_counter()
    benched = _run(bench, log)
    bench_s = time.perf_counter() - start
    return {"key": row.key, "name": row.name, "label": row.label, "model": row.model, "bits": row.bits,
            "method": None if row.checkpoint is None else plan.method, "group_size": plan.group_size,
            "checkpoint": None if row.checkpoint is None else str(row.checkpoint), "commands": commands,
            "quantize": quantized, "eval": evaluated, "eval_wall_s": eval_s, "bench": benched,
            "bench_wall_s": bench_s, "quantize_wall_s": quantize_s}


def run_study(plan: StudyPlan, say: Callable[[str], None] = print) -> list[dict]:
    """Every row of ``plan`` (finished rows reused), in the plan's order; a row that fails is reported
    with its error and the others still run."""
    results = []
    rows = plan.rows()
    for i, row in enumerate(rows, 1):
        cached = cached_row(row)
        if cached is not None:
            say(f"[{i}/{len(rows)}] {row.label}: finished earlier with the same settings, reused")
            results.append(cached)
            continue
        prefix = f"[{i}/{len(rows)}] "
        try:
            result = run_row(row, lambda line: say(prefix + line))
        except LowbitError as error:
            say(f"{prefix}{row.label}: failed: {error}")
            result = {"key": row.key, "name": row.name, "label": row.label, "model": row.model, "bits": row.bits,
                      "error": str(error)}
        _write(row.result_file, result)
        results.append(result)
    return results
