"""Log-likelihood of a continuation given a context, as lm-evaluation-harness computes it.

For a request (context c, continuation x = x_1..x_m in tokens):

    ll = Σ_i log p(x_i | c, x_<i)          greedy = ∀ i: x_i = argmax p(· | c, x_<i)

and ``last_greedy``: x_m = argmax p(· | c, x_<m) alone (Intel Neural Compressor's LAMBADA
accuracy: the text's last token predicted from all before it).

Encoding follows lm-eval: trailing whitespace of the context moves to the continuation; the pair
is encoded whole and the context alone, and the continuation is the tokens after the context's;
BOS comes first when the tokenizer puts it there, and an empty context is EOS otherwise; a request longer than ``max_length`` keeps its
last tokens. Requests run longest first in left-padded batches (positions counted from each
row's first real token), and only the rows that score a continuation get logits.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lowbit.data.tokens import bos_id
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
    bos = bos_id(tokenizer)
    prefix = [bos if bos is not None else tokenizer.eos_token_id]
    pairs = [(c or prefix, x) for c, x in (encode_pair(tokenizer, c, x, bos) for c, x in requests)]
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
    """:class:`Scored` of each (context tokens, continuation tokens) pair, already encoded.

    Requests that share a context (multiple choice) run it once: its KV cache is copied to each
    continuation (see :func:`_score_shared`); the others run whole (:func:`_score_whole`).
    """
    if any(not c for c, _ in pairs):
        raise LowbitError("a request has no context tokens: give it a prefix token (BOS or EOS) first")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (c, _) in enumerate(pairs):
        groups.setdefault(tuple(c), []).append(i)
    fits = lambda idx: all(len(pairs[i][0]) + len(pairs[i][1]) <= max_length + 1 for i in idx)  # noqa: E731
    shared = [idx for idx in groups.values() if len(idx) > 1 and fits(idx)]
    rest = sorted(set(range(len(pairs))) - {i for idx in shared for i in idx})
    results: list[Optional[Scored]] = [None] * len(pairs)
    done = 0

    def finished(scored: dict[int, Scored]) -> None:
        nonlocal done
        for i, s in scored.items():
            results[i] = s
        done += len(scored)
        if on_batch:
            on_batch(done, len(pairs))

    _score_whole(model, pairs, rest, batch_size, max_length, finished)
    _score_shared(model, pairs, shared, batch_size, finished)
    return results


def _scored(logits: torch.Tensor, target: list[int]) -> Scored:
    """Scored from the logits [m, vocab] that predict the m continuation tokens."""
    target = torch.tensor(target)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ll = float(logprobs.gather(1, target[:, None]).sum())
    if not math.isfinite(ll):
        raise LowbitError("the model's log-likelihood is not finite (NaN/Inf logits): no accuracy to report")
    hits = logprobs.argmax(dim=-1) == target
    return Scored(ll, bool(hits.all()), bool(hits[-1]), len(target))


def _left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask and position ids [n, longest] of token rows padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, width - len(tokens):] = 1
    return ids, mask, (mask.cumsum(dim=1) - 1).clamp(min=0)


def _keeps_logits(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _cache_argument(model) -> str:
    """The name the model's forward takes its KV cache by (transformers renamed past_key_values to cache)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _score_whole(model, pairs, indices: list[int], batch_size: int, max_length: int, finished) -> None:
    """Each request as one row c + x[:-1] (its last ``max_length`` tokens), longest first, left-padded."""
    inputs = {i: (pairs[i][0] + pairs[i][1])[-(max_length + 1):][:-1] for i in indices}
    order = sorted(indices, key=lambda i: -len(inputs[i]))
    extra = _keeps_logits(model)
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        ids, mask, positions = _left_padded([inputs[i] for i in batch])
        keep = max(len(pairs[i][1]) for i in batch)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                       **({"logits_to_keep": keep} if extra else {})).logits[:, -keep:]
        finished({i: _scored(logits[row, keep - len(pairs[i][1]):], pairs[i][1]) for row, i in enumerate(batch)})


def _score_shared(model, pairs, groups: list[list[int]], batch_size: int, finished) -> None:
    """Groups of requests with one context c and continuations x¹…xᵏ: c runs once (left-padded, its KV
    cache kept), the cache rows are repeated k times, and x^j[:-1] run after it (right-padded, positions
    continuing from |c|). The logits at c's last position predict every x^j_1."""
    extra, cache_name = _keeps_logits(model), _cache_argument(model)
    g = 0
    while g < len(groups):
        chunk = [groups[g]]
        while g + len(chunk) < len(groups) and sum(map(len, chunk)) + len(groups[g + len(chunk)]) <= batch_size:
            chunk.append(groups[g + len(chunk)])
        g += len(chunk)
        ids, mask, positions = _left_padded([pairs[idx[0]][0] for idx in chunk])
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **({"logits_to_keep": 1} if extra else {}))
        first = out.logits[:, -1]  # [groups, vocab]
        owner = [k for k, idx in enumerate(chunk) for _ in idx]
        members = [i for idx in chunk for i in idx]
        tails = [pairs[i][1][:-1] for i in members]
        width = max(map(len, tails))
        logits = None
        if width:
            cache = getattr(out, cache_name)
            cache.batch_select_indices(torch.tensor(owner))
            tail_ids = torch.zeros(len(members), width, dtype=torch.long)
            tail_mask = torch.zeros(len(members), width, dtype=torch.long)
            for row, tail in enumerate(tails):
                tail_ids[row, : len(tail)] = torch.tensor(tail, dtype=torch.long)
                tail_mask[row, : len(tail)] = 1
            lengths = mask.sum(dim=1)[owner]
            logits = model(input_ids=tail_ids, attention_mask=torch.cat([mask[owner], tail_mask], dim=1),
                           position_ids=lengths[:, None] + torch.arange(width), use_cache=True,
                           **{cache_name: cache}).logits
        finished({
            i: _scored(torch.cat([first[owner[row]][None], logits[row, : len(tails[row])] if width else first[:0]]),
                       pairs[i][1])
            for row, i in enumerate(members)
        })
