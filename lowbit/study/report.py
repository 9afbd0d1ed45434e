"""A study's rows as a table (terminal and markdown), JSON, plots and a self-contained HTML report.

Memory is the model's peak while it runs (``lowbit bench``: load, a 512-token prompt, 256 generated
tokens), less the interpreter and libraries every row shares. Rows are ranked by bits per byte and by
task accuracy, never by token perplexity (it depends on the tokenizer). A row is called unusable when
its bits per byte are 50% or more above its model's full precision, or every accuracy is within two
standard errors of chance.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Callable, Optional

from lowbit.evaluation.tasks import plus_minus

CHANCE = {("lambada", "acc"): 0.0, ("lambada", "acc_last"): 0.0, ("nextsent", "acc"): 0.25,
          ("nextsent", "acc_norm"): 0.25}
UNUSABLE_BPB_RATIO = 1.5


def finished(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r]


def memory_mb(row: dict) -> float:
    return row["bench"]["model_peak_bytes"] / 1e6


def bpb(row: dict) -> Optional[float]:
    return row["eval"].get("bits_per_byte")


def metrics(rows: list[dict]) -> list[tuple[str, str]]:
    return sorted({(t, m) for r in finished(rows) for t, v in r["eval"].get("tasks", {}).items() for m in v["metrics"]})


def accuracy(row: dict, task: str, metric: str) -> Optional[tuple[float, float]]:
    t = row["eval"].get("tasks", {}).get(task)
    if t is None or metric not in t["metrics"]:
        return None
    return t["metrics"][metric], t["stderr"][metric]


def unusable(row: dict, rows: list[dict]) -> Optional[str]:
    """Why the row is unusable, in words (None: it is usable)."""
    base = next((r for r in finished(rows) if r["model"] == row["model"] and r["bits"] == 16), None)
    if base is not None and bpb(row) and bpb(base) and bpb(row) >= UNUSABLE_BPB_RATIO * bpb(base):
        return f"bits per byte {bpb(row):.3f} against {bpb(base):.3f} at full precision"
    scores = [(k, accuracy(row, *k)) for k in CHANCE if accuracy(row, *k) is not None]
    if scores and all(value - CHANCE[k] <= 2 * se for k, (value, se) in scores):
        return "every task accuracy is within two standard errors of chance"
    return None


def pareto(rows: list[dict], score) -> list[dict]:
    """Rows no other row beats on both memory (lower) and ``score`` (higher), by memory."""
    points = sorted((r for r in finished(rows) if score(r) is not None), key=lambda r: (memory_mb(r), -score(r)))
    front, best = [], float("-inf")
    for r in points:
        if score(r) > best:
            front.append(r)
            best = score(r)
    return front


def _within_noise(a: dict, b: dict, task: tuple[str, str]) -> bool:
    (x, sx), (y, sy) = accuracy(a, *task), accuracy(b, *task)
    return abs(x - y) <= (sx**2 + sy**2) ** 0.5


def conclusions(rows: list[dict]) -> list[str]:
    """One sentence per memory budget where the best configuration changes (by bits per byte, the task
    accuracies said alongside), and one per unusable row."""
    done = finished(rows)
    lines = []
    front = pareto(done, lambda r: -bpb(r) if bpb(r) else None)
    tasks = [k for k in metrics(done) if k[1] in ("acc", "acc_norm")]
    for i, r in enumerate(front):
        upper = f"below {memory_mb(front[i + 1]):.0f} MB" if i + 1 < len(front) else "and above"
        said = "; ".join(f"{t} {m} {plus_minus(*accuracy(r, t, m))}" for t, m in tasks
                         if accuracy(r, t, m))
        flip = ""
        if i > 0 and front[i - 1]["model"] != r["model"]:
            flip = f" The answer flips here from {front[i - 1]['label']} to {r['model']}."
            noisy = [f"{t} {m}" for t, m in tasks if accuracy(r, t, m) and accuracy(front[i - 1], t, m)
                     and _within_noise(r, front[i - 1], (t, m))]
            if noisy:
                flip += f" On {', '.join(noisy)} the two differ by less than one standard error of the difference."
        lines.append(f"From {memory_mb(r):.0f} MB {upper}: {r['label']} is best (bits per byte {bpb(r):.3f};"
                     f" {said}).{flip}")
    for r in done:
        why = unusable(r, done)
        if why:
            lines.append(f"{r['label']} is unusable: {why}.")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['label']} did not finish: {r['error']}")
    return lines


def timing(rows: list[dict]) -> str:
    """How long the rows took to measure (evaluation and running) and to quantize, when they were made."""
    done = finished(rows)
    measured = sum(r.get("eval_wall_s", 0) + r.get("bench_wall_s", 0) for r in done)
    quantized = sum(r.get("quantize_wall_s") or (r.get("quantize") or {}).get("quantization_wall_time_s") or 0
                    for r in done)  # a reused checkpoint: the time its record says it took
    return (f"Measuring the {len(done)} rows took {measured / 60:.1f} min (evaluation and running; quantization,"
            f" cached, another {quantized / 60:.1f} min), when each row was made.")


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    keys = metrics(rows)
    header = ["model", "weights", "size MB", "peak MB (model)", "peak RSS MB", "bits/byte", "word ppl",
              *(f"{t} {m}" for t, m in keys), "decode tok/s", "CPU"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["model"], f"W{r['bits']}", *["failed"] + ["-"] * (len(header) - 3)])
            continue
        e, b = r["eval"], r["bench"]
        cells = [r["model"], "full precision" if r["bits"] == 16 else f"{r['method']} W{r['bits']} g{r['group_size']}",
                 f"{(b['size_bytes'] or 0) / 1e6:.0f}", f"{memory_mb(r):.0f}", f"{b['peak_rss_bytes'] / 1e6:.0f}",
                 "-" if bpb(r) is None else f"{bpb(r):.4f}",
                 "-" if e.get("word_perplexity") is None else f"{e['word_perplexity']:.1f}"]
        for t, m in keys:
            a = accuracy(r, t, m)
            cells.append("-" if a is None else plus_minus(*a))
        cells += [f"{b['decode_tok_s_median']:.1f}", b["cpu"]["cpu"] + " " + b["cpu"]["kernel_isa"]]
        body.append(cells)
    return header, body


def markdown(rows: list[dict]) -> str:
    header, body = table_rows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"


def _panel(ax, done: list[dict], title: str, value: Callable[[dict], Optional[float]], higher: bool) -> None:
    """One metric against the model's peak memory: a line per model through its widths, the Pareto front dashed."""
    for model in dict.fromkeys(r["model"] for r in done):
        points = sorted((r for r in done if r["model"] == model and value(r) is not None), key=memory_mb)
        ax.plot([memory_mb(r) for r in points], [value(r) for r in points], "o-", label=model)
        for r in points:
            ax.annotate("fp" if r["bits"] == 16 else f"W{r['bits']}", (memory_mb(r), value(r)),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = pareto(done, value if higher else (lambda r: -value(r) if value(r) is not None else None))
    ax.plot([memory_mb(r) for r in front], [value(r) for r in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("peak memory while running, MB (model's part)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot(rows: list[dict], folder: Path) -> list[Path]:
    """bpb.png and accuracy.png (one panel per task metric) against the model's peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = finished(rows)
    accuracies = [(f"{t} {m}", (lambda r, t=t, m=m: (accuracy(r, t, m) or (None,))[0]), True)
                  for t, m in metrics(done)]
    files = []
    for name, panels in (("bpb.png", [("bits per byte (lower is better)", bpb, False)]),
                         ("accuracy.png", accuracies)):
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for ax, (title, value, higher) in zip(axes[0], panels):
            _panel(ax, done, title, value, higher)
        fig.tight_layout()
        path = folder / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def write_report(rows: list[dict], plan_record: dict, folder: Path) -> dict:
    """study.json, table.md, the plots and report.html in ``folder``; the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    said, took = conclusions(rows), timing(rows)
    (folder / "study.json").write_text(json.dumps({"plan": plan_record, "rows": rows, "conclusions": said,
                                                   "timing": took}, indent=2))
    table = markdown(rows)
    (folder / "table.md").write_text(table)
    images = plot(rows, folder)
    header, body = table_rows(rows)
    commands = [c for r in rows for c in r.get("commands", [])]
    runtime = next((r["bench"]["memory_parts"]["runtime"] for r in finished(rows)), None)
    page = ["<!doctype html><meta charset='utf-8'><title>lowbit study</title>",
            "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}</style>",
            "<h1>lowbit study: a small model, or a quantized big one?</h1>",
            f"<p>Held-out text: {html.escape(str(plan_record.get('ppl')))}. Memory: each row's peak while running"
            " (load, a 512-token prompt, 256 generated tokens) less the interpreter and libraries all rows share"
            + ("" if runtime is None else f" ({runtime / 1e6:.0f} MB)") + ".</p>",
            "<h2>Conclusion per memory budget</h2><ul>", *(f"<li>{html.escape(s)}</li>" for s in said), "</ul>",
            f"<p>{html.escape(took)}</p>"]
    for image in images:
        data = base64.b64encode(image.read_bytes()).decode()
        page.append(f"<p><img alt='{image.stem}' src='data:image/png;base64,{data}' style='max-width:100%'></p>")
    page.append("<h2>Table</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    page += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body]
    page.append("</table><h2>Commands</h2><pre>" + html.escape("\n".join(commands)) + "</pre>")
    (folder / "report.html").write_text("\n".join(page))
    return {"json": folder / "study.json", "markdown": folder / "table.md", "plots": images,
            "html": folder / "report.html"}
