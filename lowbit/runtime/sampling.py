"""Sampling parameters (the names serving engines use) and next-token selection."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from lowbit.errors import LowbitError


@dataclass
class SamplingParams:
    """How to pick tokens: ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` disable those filters."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens < 1:
            raise LowbitError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise LowbitError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise LowbitError(f"top_k must be ≥ 0, got {self.top_k}")
        if not 0 <= self.top_p <= 1:
            raise LowbitError(f"top_p must be in [0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise LowbitError(f"{name} must be in [-2, 2], got {getattr(self, name)}")

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


def penalize(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties on logits [vocab]: l_j − c_j · frequency_penalty − [c_j > 0] · presence_penalty, with c_j
    how often token j was generated so far (counts [vocab])."""
    return logits - counts * params.frequency_penalty - (counts > 0).float() * params.presence_penalty


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """One token id from logits [vocab] (float32); ``top_p`` = 0 keeps only the most likely token."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
