"""Perplexity with the standard protocol, or llama.cpp's.

The evaluation text is concatenated and tokenized once, cut into non-overlapping windows of
``seqlen`` tokens, and every token after the first of each window is scored:

    PPL = exp( Σ_windows Σ_t −log p(x_t | x_<t) / N )

If the tokenizer starts texts with BOS (Gemma, Llama-2), each window is BOS + (seqlen − 1)
text tokens; BOS is only ever an input, never a scored target.

``protocol="llama.cpp"`` is ``llama-perplexity``'s (tools/perplexity): the token stream (BOS first, where the
tokenizer adds one) is cut into windows of ``seqlen`` tokens whose first token is replaced by BOS (where it adds
one), and only the targets of the second half are scored, t = seqlen/2 + 1 … seqlen − 1 (255 per window of 512),
so every scored token has at least half a window of context. Its ± is llama.cpp's too:
PPL · sqrt((mean nll² − mean nll²) / (N − 1)).

Token perplexity depends on the tokenizer, so two units that do not are reported too, as
lm-evaluation-harness does for wikitext: over the text the scored tokens cover (from the end of
each window's unscored first token to the end of its last), B its UTF-8 bytes and W its words
(a word counts in the window that scores its last character),

    bits per byte = Σ −log p / (B · ln 2)          word perplexity = exp( Σ −log p / W )
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lowbit.data.corpora import EvaluationText
from lowbit.data.tokens import bos_id, tokenize_text
from lowbit.errors import LowbitError


PROTOCOLS = ("lowbit", "llama.cpp")


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens: int
    windows: int
    seqlen: int
    corpus: str
    bits_per_byte: Optional[float] = None  # None: the tokenizer gives no character offsets
    word_perplexity: Optional[float] = None
    bytes: Optional[int] = None
    words: Optional[int] = None
    protocol: str = "lowbit"
    stderr: Optional[float] = None  # llama.cpp's ± (its protocol only)


@dataclass(frozen=True)
class Windows:
    """Token windows [n, seqlen], the first position whose logits are scored, and where known the UTF-8 bytes and
    words their scored tokens cover."""

    ids: torch.Tensor
    bytes: Optional[int]
    words: Optional[int]
    first: int = 0


def _scored_text(text: str, ends: torch.Tensor, spans: list[tuple[int, int]]) -> tuple[int, int]:
    """(bytes, words) of the characters the scored text tokens [a, b) of each span cover (module docstring)."""
    word_ends = [m.end() for m in re.finditer(r"\S+", text)]
    total_bytes = words = 0
    for a, b in spans:
        start = int(ends[a - 1]) if a > 0 else 0
        stop = int(ends[b - 1])
        total_bytes += len(text[start:stop].encode())
        words += bisect.bisect_right(word_ends, stop) - bisect.bisect_right(word_ends, start)
    return total_bytes, words


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise LowbitError(f"unknown perplexity protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def evaluation_windows(text: EvaluationText, tokenizer, seqlen: int, max_tokens: Optional[int],
                       protocol: str = "lowbit") -> Windows:
    if not isinstance(text, EvaluationText):
        raise TypeError("perplexity needs an EvaluationText (see lowbit.data.corpora.evaluation_text)")
    check_protocol(protocol)
    bos = bos_id(tokenizer)
    ids, ends = tokenize_text(text, tokenizer)
    if protocol == "llama.cpp":
        return _llama_cpp_windows(text, ids, ends, bos, seqlen, max_tokens)
    body = seqlen - 1 if bos is not None else seqlen
    if max_tokens:
        ids = ids[: max(max_tokens, body)]
    n = ids.numel() // body
    if n == 0:
        raise LowbitError(f"evaluation text {text.corpus} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: n * body].reshape(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=windows.dtype), windows], dim=1)
    spans = [(w * body + (0 if bos is not None else 1), (w + 1) * body) for w in range(n)]
    covered = (None, None) if ends is None else _scored_text(text.text, ends, spans)
    return Windows(windows, *covered)


def _llama_cpp_windows(text: EvaluationText, ids, ends, bos: Optional[int], seqlen: int, max_tokens: Optional[int]):
    """llama-perplexity's windows (module docstring); ``max_tokens`` counts the stream, BOS included."""
    shift = 0 if bos is None else 1
    stream = ids if bos is None else torch.cat([torch.tensor([bos]), ids])
    if max_tokens:
        stream = stream[:max_tokens]
    n = stream.numel() // seqlen
    if n == 0:
        raise LowbitError(f"evaluation text {text.corpus} has {stream.numel()} tokens, fewer than one window of {seqlen}")
    windows = stream[: n * seqlen].reshape(n, seqlen).clone()
    if bos is not None:
        windows[:, 0] = bos
    first = seqlen // 2
    spans = [(w * seqlen + first + 1 - shift, (w + 1) * seqlen - shift) for w in range(n)]
    covered = (None, None) if ends is None else _scored_text(text.text, ends, spans)
    return Windows(windows, *covered, first=first)


# float32 logits one forward may hold: a window of Gemma 3 (262k vocabulary × 512 positions) is 0.5 GB of
# them, and cross-entropy makes a second copy, so eight windows at once would peak near 9 GB.
LOGITS_BYTES = 1 << 30


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: EvaluationText,
    seqlen: int = 512,
    max_tokens: Optional[int] = None,
    batch_size: int = 4,
    on_batch: Optional[Callable[[int, int], None]] = None,
    logits_bytes: int = LOGITS_BYTES,
    protocol: str = "lowbit",
) -> PerplexityResult:
    """Token-level perplexity of ``model`` on the held-out ``text``, bits per byte and word perplexity, by
    lowbit's protocol or llama.cpp's (module docstring).

    Windows run ``batch_size`` at a time, or fewer where their logits would exceed ``logits_bytes``."""
    scored = evaluation_windows(text, tokenizer, seqlen, max_tokens, protocol)
    windows, first = scored.ids, scored.first
    vocab = model.config.get_text_config().vocab_size
    batch_size = max(1, min(batch_size, logits_bytes // (windows.shape[1] * vocab * 4)))
    nll, nll2, count = 0.0, 0.0, 0
    for i, batch in enumerate(windows.split(batch_size)):
        logits = model(input_ids=batch, use_cache=False).logits.float()
        targets = batch[:, first + 1 :]
        token_nll = F.cross_entropy(logits[:, first:-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                    reduction="none").double()
        loss = token_nll.sum()
        nll2 += float((token_nll**2).sum())
        if not math.isfinite(float(loss)):
            raise LowbitError(
                f"the model's loss on window {i * batch_size + 1}–{i * batch_size + len(batch)} of {text.corpus} is"
                " not finite (NaN/Inf logits): the model computes garbage, no perplexity to report"
            )
        nll += float(loss)
        count += targets.numel()
        if on_batch:
            on_batch(min((i + 1) * batch_size, len(windows)), len(windows))
    ppl = math.exp(nll / count)
    spread = nll2 / count - (nll / count) ** 2
    return PerplexityResult(
        ppl, count, len(windows), windows.shape[1], text.corpus,
        bits_per_byte=None if not scored.bytes else nll / (scored.bytes * math.log(2)),
        word_perplexity=None if not scored.words else math.exp(nll / scored.words),
        bytes=scored.bytes, words=scored.words, protocol=protocol,
        stderr=ppl * math.sqrt(max(spread, 0.0) / (count - 1)) if protocol == "llama.cpp" and count > 1 else None,
    )
