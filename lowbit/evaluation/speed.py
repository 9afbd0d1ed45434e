"""Inference speed and the memory of running a model: load, then a prompt and a greedy decode after it,
repeated for median and best.

Peak memory as the quantization articles measure it (load, a 512-token prompt, 256 generated tokens),
explained by its parts. The peak RSS is read after the load, then reset (:func:`reset_peak_rss`) and
read again after the runs:

    peak         max(load peak, run peak)
    runtime      RSS before the model loads: interpreter, torch, transformers (the same for every model)
    weights      the decoder's resident weight tensors
    KV cache     the preallocated cache (context × layers × 2 × KV heads × head dim)
    activations  run peak − RSS after load: the forward's transient buffers (the prompt's are the largest)
    other        RSS after load − runtime − weights − KV cache (tokenizer, code, allocator slack)
    model peak   peak − runtime: what this model adds to a process
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from lowbit.evaluation.footprint import folder_size, peak_rss_bytes, reset_peak_rss


@dataclass
class SpeedResult:
    model: str
    quantization: Optional[str]
    decoder: str
    threads: int
    prompt_tokens: int
    decode_tokens: int
    repeats: int
    load_time_s: float
    size_bytes: Optional[int]
    rss_before_load_bytes: int
    rss_after_load_bytes: int
    resident_weights_bytes: int
    peak_rss_bytes: int
    kv_cache_bytes: int
    load_peak_rss_bytes: int
    run_peak_rss_bytes: int
    run_peak_exact: bool  # False: the system could not reset the peak, so the run peak includes the load's
    model_peak_bytes: int
    memory_parts: dict
    prefill_tok_s_median: float
    prefill_tok_s_max: float
    decode_tok_s_median: float
    decode_tok_s_max: float
    cpu: dict
    kernels: dict
    notices: list

    def to_dict(self) -> dict:
        return asdict(self)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_speed(llm, prompt_tokens: int = 512, decode_tokens: int = 256, repeats: int = 3) -> SpeedResult:
    """Prefill a random prompt of ``prompt_tokens`` and decode ``decode_tokens`` greedily after it, ``repeats`` times,
    right after ``llm`` was loaded in this process (so that the load peak is the model's).

    Reports the median and the best run (best = least disturbed by other tenants of the machine).
    """
    load_peak = peak_rss_bytes()
    exact = reset_peak_rss()
    decoder = llm.decoder
    vocab = llm.tokenizer.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=generator)
    llm.check_length(prompt_tokens, decode_tokens)
    decoder(prompt[:, :16], 0)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        holder = {}
        prefill.append(prompt_tokens / _timed(lambda: holder.update(logits=decoder(prompt, 0))))

        def run_decode():
            token = holder["logits"][0, -1].argmax().view(1, 1)
            for i in range(decode_tokens):
                token = decoder(token, prompt_tokens + i)[0, -1].argmax().view(1, 1)

        decode.append(decode_tokens / _timed(run_decode))
    tensors = [(n, t) for n, t in (*decoder.named_buffers(), *decoder.named_parameters()) if t is not None]
    in_cache = [n.startswith("cache.") for n, _ in tensors]  # the lean decoder's KVCache and its scales
    cache = sum(t.numel() * t.element_size() for (_, t), c in zip(tensors, in_cache) if c)
    weights = sum(t.numel() * t.element_size() for (_, t), c in zip(tensors, in_cache) if not c)
    run_peak = peak_rss_bytes()
    runtime, after_load = llm.rss_before_load_bytes, llm.rss_after_load_bytes
    parts = {"runtime": runtime, "weights": weights, "kv_cache": cache, "activations": max(0, run_peak - after_load),
             "other": after_load - runtime - weights - cache}
    path = llm.source.path
    return SpeedResult(
        model=llm.name,
        quantization=llm.quantization,
        decoder=type(decoder).__name__,
        threads=llm.threads,
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
        repeats=repeats,
        load_time_s=llm.load_time_s,
        size_bytes=None if path is None else folder_size(Path(path)),
        rss_before_load_bytes=llm.rss_before_load_bytes,
        rss_after_load_bytes=llm.rss_after_load_bytes,
        resident_weights_bytes=weights,
        peak_rss_bytes=max(load_peak, run_peak),
        kv_cache_bytes=cache,
        load_peak_rss_bytes=load_peak,
        run_peak_rss_bytes=run_peak,
        run_peak_exact=exact,
        model_peak_bytes=max(load_peak, run_peak) - runtime,
        memory_parts=parts,
        prefill_tok_s_median=statistics.median(prefill),
        prefill_tok_s_max=max(prefill),
        decode_tok_s_median=statistics.median(decode),
        decode_tok_s_max=max(decode),
        cpu=llm.cpu(),
        kernels=llm.kernels(),
        notices=list(llm.notices),
    )



def measure_depths(llm, depths: list[int], decode_tokens: int = 64, repeats: int = 3) -> list[dict]:
    """Decode tokens/s after a random prompt of each depth (the context a step attends over): the prompt is
    prefilled once per depth, then ``decode_tokens`` greedy steps are timed ``repeats`` times from that depth
    (each repeat rewrites the same positions). Median and best per depth."""
    decoder = llm.decoder
    generator = torch.Generator().manual_seed(0)
    rows = []
    for depth in depths:
        llm.check_length(depth, decode_tokens)
        prompt = torch.randint(0, llm.tokenizer.vocab_size, (1, depth), generator=generator)
        first = decoder(prompt, 0)[0, -1].argmax().view(1, 1)
        speeds = []
        for _ in range(repeats):
            def run_decode(token=first):
                for i in range(decode_tokens):
                    token = decoder(token, depth + i)[0, -1].argmax().view(1, 1)

            speeds.append(decode_tokens / _timed(run_decode))
        rows.append({"depth": depth, "decode_tok_s_median": statistics.median(speeds), "decode_tok_s_max": max(speeds)})
    return rows
