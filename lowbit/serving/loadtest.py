"""A load test for an OpenAI-compatible server: N concurrent streaming clients on mixed prompts, some of which
disconnect mid-answer, measured as a client sees it (bench/serve.py runs it against ``lowbit serve``).

Per request: time to first token (TTFT: the first chunk with text), the gaps between later text chunks
(inter-token latency), completion tokens (the usage chunk), and whether it failed (an error status, an error
event, a broken stream, or no [DONE]); a request the client abandons on purpose is counted apart, not as failed.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx2 as httpx


@dataclass
class Outcome:
    ttft_s: Optional[float] = None
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    failed: Optional[str] = None
    abandoned: bool = False


def percentile(values: list[float], q: float) -> Optional[float]:
    """The q-quantile (0 ≤ q ≤ 1) by linear interpolation, None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    lo = int(at)
    return ordered[lo] + (ordered[min(lo + 1, len(ordered) - 1)] - ordered[lo]) * (at - lo)


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      abandon_after: Optional[int] = None) -> Outcome:
    """One streaming completion; ``abandon_after``: close the connection after that many text chunks."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    out, start, last, done = Outcome(), time.perf_counter(), None, False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                out.failed = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    out.failed = f"error event: {event['error'].get('message')}"
                    return out
                if event.get("usage"):
                    out.tokens = event["usage"]["completion_tokens"]
                text = "".join(c.get("text") or "" for c in event.get("choices", []))
                if text:
                    now = time.perf_counter()
                    if out.ttft_s is None:
                        out.ttft_s = now - start
                    else:
                        out.gaps_s.append(now - last)
                    last = now
                    if abandon_after is not None and len(out.gaps_s) + 1 >= abandon_after:
                        out.abandoned = True
                        return out
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        out.failed = f"{type(exc).__name__}: {exc}"
        return out
    if not done:
        out.failed = "stream ended without [DONE]"
    return out


async def run_clients(url: str, model: str, prompts: list[str], clients: int, requests_each: int, max_tokens: int,
                      abandon_every: int = 0) -> dict:
    """``clients`` concurrent clients, each sending ``requests_each`` requests in turn (prompts taken round-robin);
    every ``abandon_every``-th request (0: none) disconnects after 4 text chunks. Returns the run's summary."""
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async def client_loop(c: int, http: httpx.AsyncClient) -> None:
        for r in range(requests_each):
            n = c * requests_each + r
            abandon = 4 if abandon_every and n % abandon_every == abandon_every - 1 else None
            outcomes.append(await one_request(http, url, model, prompts[n % len(prompts)], max_tokens, abandon))

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client_loop(c, http) for c in range(clients)))
    wall = time.perf_counter() - start
    return summarize(outcomes, wall, clients)


def summarize(outcomes: list[Outcome], wall_s: float, clients: int) -> dict:
    finished = [o for o in outcomes if not o.failed and not o.abandoned]
    ttft = [o.ttft_s for o in finished if o.ttft_s is not None]
    gaps = [g for o in finished for g in o.gaps_s]
    tokens = sum(o.tokens for o in finished)
    return {
        "clients": clients, "requests": len(outcomes), "completed": len(finished),
        "abandoned": sum(o.abandoned for o in outcomes), "failed": sum(bool(o.failed) for o in outcomes),
        "failures": sorted({o.failed for o in outcomes if o.failed})[:5],
        "wall_s": wall_s, "requests_per_s": len(finished) / wall_s, "tokens_per_s": tokens / wall_s,
        "completion_tokens": tokens,
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
        "itl_p50_s": percentile(gaps, 0.5), "itl_p95_s": percentile(gaps, 0.95),
    }


async def health_while(url: str, busy: asyncio.Future, big_body_mb: int = 50) -> dict:
    """/health latencies (every 50 ms) while ``busy`` runs, with one request body of ``big_body_mb`` MB sent
    alongside; returns p50/p99 and the big body's status."""
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=120) as http:

        async def big() -> str:
            body = b'{"prompt": "' + b"x" * (big_body_mb << 20) + b'"}'
            try:
                r = await http.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
                return str(r.status_code)
            except httpx.HTTPError as exc:  # the server may close the connection on a body it refuses
                return f"{type(exc).__name__} (connection closed before the whole body was sent)"

        sender = asyncio.ensure_future(big())
        while not busy.done():
            t0 = time.perf_counter()
            await http.get(f"{url}/health")
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)
        status = await sender
    return {"health_probes": len(latencies), "health_p50_s": percentile(latencies, 0.5),
            "health_p99_s": percentile(latencies, 0.99), "big_body_status": status}
