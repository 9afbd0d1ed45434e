"""Load test of ``lowbit serve``: 1, 4, 8 and 16 concurrent streaming clients on loopback, prompts of mixed
length (~128 tokens on average), 64 generated tokens each, every fourth request of the multi-client runs
abandoned after 4 tokens; then /health latency while 16 clients and one 50 MB body are in flight.

Reports requests/s, completion tokens/s, time to first token and inter-token latency (p50/p95), the server's
peak RSS, and failed well-formed requests (which must be zero), with the CPU; plus the single-client prefill
time and decode step the TTFT target is measured against.

    python bench/serve.py --model out/kvcache-smollm2/w4-g64 --out out/serve-smollm2
    python bench/serve.py --model out/kvcache-gemma/w4-g64 --out out/serve-gemma
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import psutil

from lowbit.data.corpora import evaluation_text
from lowbit.runtime.cpu import describe
from lowbit.serving.loadtest import health_while, run_clients


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(a) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lowbit.cli.main", "serve", a.model, "--port", str(port), "--served-model-name", "m",
           "--max-batch", str(a.max_batch), "--max-model-len", str(a.max_model_len)]
    print("+", " ".join(cmd[2:]), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    threading.Thread(target=lambda: [print(line, end="", file=sys.stderr) for line in proc.stderr], daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start")


def prompts(n: int = 16) -> list[str]:
    """Mixed-length prompts from held-out text: 64 to 192 words (about 0.75 to 2.25 x 128 tokens / 1.3)."""
    words = evaluation_text("austen").text.split()
    out, at = [], 0
    for i in range(n):
        length = 64 + (i * 37) % 129
        out.append(" ".join(words[at : at + length]))
        at += length
    return out


class PeakRss:
    """The process tree's peak resident memory, sampled every 50 ms."""

    def __init__(self, pid: int):
        self.proc, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self.stop.is_set():
            try:
                rss = self.proc.memory_info().rss + sum(c.memory_info().rss for c in self.proc.children(recursive=True))
                self.peak = max(self.peak, rss)
            except psutil.Error:
                return
            time.sleep(0.05)


def fmt(x, scale=1.0, digits=2) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="what `lowbit serve` loads (a W4 checkpoint folder)")
    p.add_argument("--out", type=Path, default=Path("out/serve"))
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--requests-each", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=512)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(a)
    rss = PeakRss(proc.pid)
    texts = prompts()
    rows = []
    try:
        asyncio.run(run_clients(url, "m", texts[:2], 1, 1, 4, 0))  # warm-up
        for n in [int(c) for c in a.clients.split(",")]:
            rss.peak = 0
            row = asyncio.run(run_clients(url, "m", texts, n, a.requests_each, a.max_tokens, 4 if n > 1 else 0))
            row["peak_rss_mb"] = rss.peak / 2**20
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

        async def health_under_load():
            busy = asyncio.ensure_future(run_clients(url, "m", texts, 16, 1, a.max_tokens, 4))
            probe = await health_while(url, busy)
            return {**probe, **(await busy)}

        rss.peak = 0
        health = asyncio.run(health_under_load())
        health["peak_rss_mb"] = rss.peak / 2**20
    finally:
        rss.stop.set()
        proc.terminate()
        proc.wait(timeout=60)
    cpu = describe()
    head = (f"{a.model}, lowbit serve --max-batch {a.max_batch} --max-model-len {a.max_model_len}; streaming clients, "
            f"prompts 64-192 words of held-out austen, {a.max_tokens} tokens each, greedy; CPU {cpu.get('cpu')} "
            f"(kernels {cpu.get('kernel_isa')}, {psutil.cpu_count()} cores)")
    lines = [head, "| clients | requests | done | abandoned | failed | req/s | tok/s | TTFT p50 s | TTFT p95 s |"
             " ITL p50 ms | ITL p95 ms | peak RSS MB |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['completed']} | {r['abandoned']} | {r['failed']} | "
                     f"{fmt(r['requests_per_s'])} | {fmt(r['tokens_per_s'], digits=1)} | {fmt(r['ttft_p50_s'])} | "
                     f"{fmt(r['ttft_p95_s'])} | {fmt(r['itl_p50_s'], 1e3, 1)} | {fmt(r['itl_p95_s'], 1e3, 1)} | "
                     f"{r['peak_rss_mb']:.0f} |")
    single = next((r for r in rows if r["clients"] == 1), None)
    eight = next((r for r in rows if r["clients"] == 8), None)
    if single and eight:
        lines.append(f"aggregate tok/s at 8 clients: {eight['tokens_per_s'] / single['tokens_per_s']:.2f}x one client's")
    lines.append(f"/health under 16 clients and a 50 MB body: p50 {fmt(health['health_p50_s'], 1e3, 1)} ms, p99 "
                 f"{fmt(health['health_p99_s'], 1e3, 1)} ms over {health['health_probes']} probes; the 50 MB body: "
                 f"{health['big_body_status']}; failed {health['failed']}; peak RSS {health['peak_rss_mb']:.0f} MB")
    if any(r["failures"] for r in rows + [health]):
        lines.append(f"failures: {[r['failures'] for r in rows + [health] if r['failures']]}")
    table = "\n".join(lines)
    print(table)
    (a.out / "serve.json").write_text(json.dumps({"cpu": cpu, "rows": rows, "health": health}, indent=2))
    (a.out / "serve.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
