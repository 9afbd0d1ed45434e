"""Log-likelihood of a continuation given a context, as lm-evaluation-harness computes it.

For a request (context c, continuation x = x_1..x_m in tokens):

    ll = Σ_i log p(x_i | c, x_<i)          greedy = ∀ i: x_i = argmax p(· | c, x_<i)

and ``last_greedy``: x_m = argmax p(· | c, x_<m) alone (Intel Neural Compressor's LAMBADA
accuracy: the text's last token predicted from all before it).

Encoding follows lm-eval: trailing whitespace of the context moves to the continuation; the pair
is encoded whole and the context alone, and the continuation is the tokens after the context's;
BOS comes first when the tokenizer puts it there; a request longer than ``max_length`` keeps its
last tokens. Requests run longest first in left-padded batches (positions counted from each
row's first real token), and only the rows that score a continuation get logits.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lowbit.calibration.sampling import _wants_bos
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Scored:
    loglikelihood: float
    greedy: bool
    last_greedy: bool
    tokens: int  # of the continuation


def encode_pair(tokenizer, context: str, continuation: str, bos: Optional[int]) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) of one request (see the module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    head = tokenizer(context, add_special_tokens=False).input_ids
    prefix = [] if bos is None else [bos]
    return prefix + whole[: len(head)], whole[len(head):]


def loglikelihoods(
    model,
    tokenizer,
    requests: list[tuple[str, str]],
    batch_size: int = 8,
    max_length: int = 2048,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> list[Scored]:
    """One :class:`Scored` per (context, continuation) request, in the requests' order."""
    bos = tokenizer.bos_token_id if _wants_bos(tokenizer) else None
    pairs = [encode_pair(tokenizer, c, x, bos) for c, x in requests]
    for (context, continuation), (c, x) in zip(requests, pairs):
        if not x:
            raise LowbitError(f"continuation {continuation!r} after {context[-40:]!r} encodes to no tokens")
    return score_tokens(model, pairs, batch_size, max_length, on_batch)


@torch.no_grad()
def score_tokens(
    model,
    pairs: list[tuple[list[int], list[int]]],
    batch_size: int = 8,
    max_length: int = 2048,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> list[Scored]:
    """:class:`Scored` of each (context tokens, continuation tokens) pair, already encoded."""
    inputs = [(c + x)[-(max_length + 1):][:-1] for c, x in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    results: list[Optional[Scored]] = [None] * len(pairs)
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        width = len(inputs[batch[0]])
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(inputs[i]):] = torch.tensor(inputs[i])
            mask[row, width - len(inputs[i]):] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        keep = max(len(pairs[i][1]) for i in batch)
        extra = {"logits_to_keep": keep} if keeps_logits else {}
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **extra).logits
        logits = logits[:, -keep:]
        for row, i in enumerate(batch):
            target = torch.tensor(pairs[i][1])
            logprobs = torch.log_softmax(logits[row, keep - len(target):].float(), dim=-1)
            ll = float(logprobs.gather(1, target[:, None]).sum())
            if not math.isfinite(ll):
                raise LowbitError("the model's log-likelihood is not finite (NaN/Inf logits): no accuracy to report")
            hits = logprobs.argmax(dim=-1) == target
            results[i] = Scored(ll, bool(hits.all()), bool(hits[-1]), len(target))
        if on_batch:
            on_batch(min(b + batch_size, len(order)), len(order))
    return results
