"""One generation's state between decode steps: sampling, detokenization, stop strings, penalties, logprobs.

The decoder only turns tokens into logits; a ``Sequence`` turns each step's logits into the next token and the
text a client may see (``advance``). One request or many (batched decoding) drive the same class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from lowbit.runtime.sampling import SamplingParams, penalize, sample
from lowbit.runtime.stops import StopMatcher


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (its raw logits, before temperature and
    penalties), and the ``top`` most likely alternatives at that step as (token, logprob)."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Step:
    """What one decode step releases: text (possibly empty while a stop string might still match), the
    logprobs of the tokens whose text is now shown, and the finish reason on the last step."""

    delta: str
    finish: Optional[str] = None
    token: Optional[int] = None  # the sampled token to feed back (None once finished)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    generated: int = 0  # tokens generated so far (an end-of-sequence token is not counted)


class Sequence:
    """``advance(logits)`` → Step for one generation of ``params`` with ``tokenizer``; ``top_logprobs``: None for no
    logprobs, else how many alternatives to report per token."""

    def __init__(self, tokenizer, params: SamplingParams, eos_ids: set[int], top_logprobs: Optional[int] = None):
        self.tokenizer, self.params, self.eos_ids = tokenizer, params, eos_ids
        self.top_logprobs = top_logprobs
        self.generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        self.generated: list[int] = []
        self.text = ""
        self.stops = StopMatcher(params.stop)
        self.counts: Optional[torch.Tensor] = None  # tokens generated per vocabulary id, for the penalties
        self.pending: list[tuple[int, TokenLogprob]] = []  # (text end offset, entry) not yet released
        self.finished = False

    def advance(self, logits: torch.Tensor) -> Step:
        """The next token from logits [vocab] (float32) and what it releases."""
        p = self.params
        if p.penalized:
            self.counts = torch.zeros_like(logits) if self.counts is None else self.counts
            chosen = sample(penalize(logits, p, self.counts), p, self.generator)
        else:
            chosen = sample(logits, p, self.generator)
        if chosen in self.eos_ids and not p.ignore_eos:
            return self._finish(self.stops.flush(self.text), "stop")
        self.generated.append(chosen)
        if self.counts is not None:
            self.counts[chosen] += 1
        full = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        if not full.endswith("\ufffd"):  # else an incomplete UTF-8 sequence: wait for the next token
            self.text = full
        if self.top_logprobs is not None:
            self.pending.append((len(self.text), self._logprob(logits, chosen)))
        delta, stopped = self.stops.feed(self.text)
        if stopped:
            return self._finish(delta, "stop")
        if len(self.generated) == p.max_tokens:
            return self._finish(delta + self.stops.flush(self.text), "length")
        return Step(delta, None, chosen, self._release(self.stops.shown), len(self.generated))

    def _finish(self, delta: str, reason: str) -> Step:
        self.finished = True
        return Step(delta, reason, None, self._release(self.stops.shown), len(self.generated))

    def _release(self, shown: int) -> list[TokenLogprob]:
        """Entries whose token text lies within the shown text (a token cut by a stop string is never shown)."""
        n = next((i for i, (end, _) in enumerate(self.pending) if end > shown), len(self.pending))
        out, self.pending = [entry for _, entry in self.pending[:n]], self.pending[n:]
        return out

    def _logprob(self, logits: torch.Tensor, chosen: int) -> TokenLogprob:
        logp = torch.log_softmax(logits.float(), -1)
        name = lambda i: self.tokenizer.decode([i])  # noqa: E731
        top = []
        if self.top_logprobs:
            values, ids = torch.topk(logp, self.top_logprobs)
            top = [(name(int(i)), float(v)) for v, i in zip(values, ids)]
        return TokenLogprob(name(chosen), float(logp[chosen]), top)
