"""Log-likelihood of a continuation given a context, as lm-evaluation-harness computes it.

For a request (context c, continuation x = x_1..x_m in tokens):

    ll = Σ_i log p(x_i | c, x_<i)          greedy = ∀ i: x_i = argmax p(· | c, x_<i)

and ``last_greedy``: x_m = argmax p(· | c, x_<m) alone (Intel Neural Compressor's LAMBADA
accuracy: the text's last token predicted from all before it).

Encoding follows lm-eval: trailing whitespace of the context moves to the continuation; the pair
is encoded whole and the context alone, and the continuation is the tokens after the context's;
BOS comes first when the tokenizer puts it there, and an empty context is EOS otherwise; a request
longer than ``max_length`` keeps its last tokens.

Requests are packed, without padding, into rows of a few hundred tokens: a context shared by several
continuations (multiple choice) appears once, each continuation after it with positions continuing
from the context, and an attention mask lets every token see exactly what it would see in a row of
its own (hybrid models get a mask per attention kind, the sliding window applied on positions). Only
the positions that predict a continuation token get logits. A probe checks the packing against plain
forwards on each model first; where it does not hold, each request runs in a left-padded row instead.
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lowbit.data.tokens import bos_id
from lowbit.errors import LowbitError


PACK_TOKENS_PER_REQUEST = 128  # a forward holds about batch_size × this many tokens
PROBED = "lowbit_packing_problem"  # the model attribute that keeps its probe's verdict
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}  # packed vs plain log-probabilities; else 0.1


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

    Requests are packed into rows of about ``batch_size`` × :data:`PACK_TOKENS_PER_REQUEST` tokens, a
    shared context once per row (see :func:`_score_packed`); a model whose attention cannot take the
    packing's mask (checked on the first requests, :func:`packing_problem`) runs each request as a
    padded row of its own instead, and says so.
    """
    if any(not c for c, _ in pairs):
        raise LowbitError("a request has no context tokens: give it a prefix token (BOS or EOS) first")
    results: list[Optional[Scored]] = [None] * len(pairs)
    done = 0

    def finished(scored: dict[int, Scored]) -> None:
        nonlocal done
        for i, s in scored.items():
            results[i] = s
        done += len(scored)
        if on_batch:
            on_batch(done, len(pairs))

    groups = _groups(pairs, max_length)
    if not hasattr(model, PROBED):  # once per model: the harness scores each document in a call of its own
        problem = packing_problem(model, groups[0])
        if problem is not None:
            print(f"lowbit: scoring each request in a padded row of its own, slower ({problem})", file=sys.stderr)
        setattr(model, PROBED, problem)
    if getattr(model, PROBED) is None:
        _score_packed(model, groups, batch_size * PACK_TOKENS_PER_REQUEST, finished)
    else:
        _score_whole(model, pairs, list(range(len(pairs))), batch_size, max_length, finished)
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


@dataclass(frozen=True)
class _Group:
    """A context c and the requests that continue it: (request index, continuation tokens x)."""

    context: list[int]
    tails: list[tuple[int, list[int]]]

    @property
    def tokens(self) -> int:
        """Tokens it takes in a packed row: c once, then x[:-1] of each continuation."""
        return len(self.context) + sum(len(x) - 1 for _, x in self.tails)


def _groups(pairs: list[tuple[list[int], list[int]]], max_length: int) -> list[_Group]:
    """Requests grouped by context; a request longer than ``max_length`` + 1 tokens keeps its last ones, alone."""
    by_context: dict[tuple[int, ...], _Group] = {}
    alone = []
    for i, (c, x) in enumerate(pairs):
        if len(x) > max_length:
            raise LowbitError(f"a continuation of {len(x)} tokens is longer than the model's {max_length}")
        if len(c) + len(x) <= max_length + 1:
            by_context.setdefault(tuple(c), _Group(c, [])).tails.append((i, x))
        else:
            alone.append(_Group((c + x)[-(max_length + 1):-len(x)], [(i, x)]))
    return list(by_context.values()) + alone


def _layer_kinds(model) -> set[str]:
    """The kinds of attention the model's layers use, by transformers' ``layer_types`` names."""
    config = model.config.get_text_config()
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return set(kinds)
    return {"sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"}


@dataclass
class _Row:
    """One group as a row: c, then x[:-1] of each continuation, positions continuing from c in each.

    ``branch`` per token: −1 for a context token, j for continuation j; ``wanted`` holds (request, row
    indices whose logits predict x, x).
    """

    ids: list[int]
    positions: list[int]
    branch: list[int]
    wanted: list[tuple[int, list[int], list[int]]]


PAD_BRANCH = -2


def _row(group: _Group) -> _Row:
    n = len(group.context)
    row = _Row(list(group.context), list(range(n)), [-1] * n, [])
    for j, (i, x) in enumerate(group.tails):
        start = len(row.ids)
        row.ids += x[:-1]
        row.positions += range(n, n + len(x) - 1)
        row.branch += [j] * (len(x) - 1)
        row.wanted.append((i, [n - 1, *range(start, len(row.ids))], x))  # c's last token predicts x_1
    return row


def _attention_masks(model, branch: torch.Tensor, positions: torch.Tensor):
    """Additive masks [B, 1, L, L] from ``branch``/``positions`` [B, L]: query t sees key u iff u ≤ t and u
    is a context token or in t's own continuation, and (sliding layers) positions less than the window
    apart. One tensor for a model with one kind of attention, else {kind: mask} as transformers' hybrid
    models take it. Padding (branch :data:`PAD_BRANCH`, at the end of a row) is seen by padding only."""
    config = model.config.get_text_config()
    order = torch.arange(branch.shape[1])
    seen = (order[None, :] <= order[:, None]) & ((branch[:, None, :] == -1) | (branch[:, None, :] == branch[:, :, None]))
    allowed = {"full_attention": seen}
    window = getattr(config, "sliding_window", None)
    if window:
        allowed["sliding_attention"] = seen & (positions[:, :, None] - positions[:, None, :] < window)
    dtype = model.dtype
    masks = {kind: torch.zeros(seen.shape, dtype=dtype).masked_fill(~allowed[kind], torch.finfo(dtype).min)[:, None]
             for kind in _layer_kinds(model)}
    return next(iter(masks.values())) if len(masks) == 1 else masks


def _forward_packed(model, groups: list[_Group]) -> list[tuple[int, torch.Tensor, list[int]]]:
    """(request, logits [m, vocab] predicting its x, x) of every request of ``groups``, one row per group,
    in one forward. The output head runs on the wanted positions only (gathered by a hook on it)."""
    rows = [_row(g) for g in groups]
    width = max(len(r.ids) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    branch = torch.full((len(rows), width), PAD_BRANCH)
    for b, r in enumerate(rows):
        ids[b, : len(r.ids)], positions[b, : len(r.ids)] = torch.tensor(r.ids), torch.tensor(r.positions)
        branch[b, : len(r.ids)] = torch.tensor(r.branch)
    at = [(b, t) for b, r in enumerate(rows) for _, wanted, _ in r.wanted for t in wanted]
    rows_b, rows_t = torch.tensor(at).T
    gather = lambda module, args: (args[0][rows_b, rows_t][None], *args[1:])  # noqa: E731
    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        logits = model(input_ids=ids, position_ids=positions, attention_mask=_attention_masks(model, branch, positions),
                       use_cache=False, logits_to_keep=0).logits[0]
    finally:
        handle.remove()
    out, k = [], 0
    for r in rows:
        for i, wanted, x in r.wanted:
            out.append((i, logits[k : k + len(wanted)], x))
            k += len(wanted)
    return out


@torch.no_grad()
def packing_problem(model, group: _Group) -> Optional[str]:
    """Why this model cannot score packed rows (None: it can). Besides what its forward accepts, a probe
    checks that a packed row gives the log-probabilities of plain forwards, on two continuations of a
    piece of ``group``'s context (a model that ignored the mask would let one see the other)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if not (hasattr(model, "config") and hasattr(model.config, "get_text_config") and _keeps_logits(model) and head is not None):
        return "it has no transformers config, output head or logits_to_keep"
    unknown = _layer_kinds(model) - {"full_attention", "sliding_attention"}
    if unknown:
        return f"attention {', '.join(sorted(unknown))} is not one lowbit's packing mask knows"
    c, x = group.context[-16:], group.tails[0][1]
    tails = [(x + c)[:8], (c[::-1] + x)[:6]]
    probe = [_Group(c, [(0, tails[0]), (1, tails[1])]), _Group(c[-3:], [(2, tails[0][:3])])]
    plain = [(c, tails[0]), (c, tails[1]), (c[-3:], tails[0][:3])]
    ids, mask, positions = _left_padded([context + tail[:-1] for context, tail in plain])
    keep = max(len(tail) for _, tail in plain)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                   logits_to_keep=keep).logits[:, -keep:]
    worst = 0.0
    for row, ((_, packed, _), (_, tail)) in enumerate(zip(_forward_packed(model, probe), plain)):
        diff = torch.log_softmax(packed.float(), -1) - torch.log_softmax(logits[row, keep - len(tail):].float(), -1)
        worst = max(worst, float(diff.abs().max()))
    tolerance = PROBE_TOLERANCE.get(model.dtype, 0.1)
    if not worst <= tolerance:
        return f"a packed row's log-probabilities differ from plain forwards by {worst:.3g} > {tolerance:g}"
    return None


def _score_packed(model, groups: list[_Group], row_tokens: int, finished) -> None:
    """One row per group, longest first, as many rows per forward as keep rows × width ≤ ``row_tokens``."""
    batch: list[_Group] = []
    for group in sorted(groups, key=lambda g: -g.tokens) + [None]:
        if batch and (group is None or (len(batch) + 1) * batch[0].tokens > row_tokens):
            finished({i: _scored(logits, x) for i, logits, x in _forward_packed(model, batch)})
            batch = []
        if group is not None:
            batch.append(group)
