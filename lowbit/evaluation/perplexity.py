"""Perplexity with the standard protocol.

The evaluation text is concatenated and tokenized once, cut into non-overlapping windows of
``seqlen`` tokens, and every token after the first of each window is scored:

    PPL = exp( Σ_windows Σ_t −log p(x_t | x_<t) / N )

If the tokenizer starts texts with BOS (Gemma, Llama-2), each window is BOS + (seqlen − 1)
text tokens; BOS is only ever an input, never a scored target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lowbit.calibration.sampling import _wants_bos
from lowbit.data.corpora import EvaluationText
from lowbit.data.tokens import token_stream
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens: int
    windows: int
    seqlen: int
    corpus: str


def evaluation_windows(text: EvaluationText, tokenizer, seqlen: int, max_tokens: Optional[int]) -> torch.Tensor:
    if not isinstance(text, EvaluationText):
        raise TypeError("perplexity needs an EvaluationText (see lowbit.data.corpora.evaluation_text)")
    bos = tokenizer.bos_token_id if _wants_bos(tokenizer) else None
    body = seqlen - 1 if bos is not None else seqlen
    ids = token_stream(text, tokenizer)
    if max_tokens:
        ids = ids[: max(max_tokens, body)]
    n = ids.numel() // body
    if n == 0:
        raise LowbitError(f"evaluation text {text.corpus} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: n * body].reshape(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=windows.dtype), windows], dim=1)
    return windows


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: EvaluationText,
    seqlen: int = 512,
    max_tokens: Optional[int] = None,
    batch_size: int = 4,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> PerplexityResult:
    """Token-level perplexity of ``model`` on the held-out ``text``."""
    windows = evaluation_windows(text, tokenizer, seqlen, max_tokens)
    nll, count = 0.0, 0
    for i, batch in enumerate(windows.split(batch_size)):
        logits = model(input_ids=batch, use_cache=False).logits.float()
        targets = batch[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        if not math.isfinite(float(loss)):
            raise LowbitError(
                f"the model's loss on window {i * batch_size + 1}–{i * batch_size + len(batch)} of {text.corpus} is"
                " not finite (NaN/Inf logits): the model computes garbage, no perplexity to report"
            )
        nll += float(loss)
        count += targets.numel()
        if on_batch:
            on_batch(min((i + 1) * batch_size, len(windows)), len(windows))
    return PerplexityResult(math.exp(nll / count), count, len(windows), windows.shape[1], text.corpus)
