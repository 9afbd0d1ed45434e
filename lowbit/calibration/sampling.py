"""Calibration batches: random non-overlapping token windows from a corpus's calibration part."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.data.corpora import CalibrationText
from lowbit.data.tokens import bos_id, token_stream
from lowbit.errors import LowbitError


def calibration_windows(
    text: CalibrationText, tokenizer, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens [nsamples, seqlen], drawn without overlap."""
    if not isinstance(text, CalibrationText):
        raise TypeError("calibration needs a CalibrationText (see lowbit.data.corpora.calibration_text)")
    if nsamples < 1 or seqlen < 2:
        raise LowbitError(f"need at least 1 sample of at least 2 tokens (got {nsamples} × {seqlen})")
    ids = token_stream(text, tokenizer)
    available = ids.numel() // seqlen
    if available < nsamples:
        raise LowbitError(
            f"calibration text {text.corpus} has {ids.numel():,} tokens, too short for {nsamples} samples of"
            f" {seqlen} tokens ({nsamples * seqlen:,} needed); lower --nsamples/--seqlen or give more text"
        )
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=g)[:nsamples]
    windows = ids[: available * seqlen].reshape(available, seqlen)[chosen]
    bos = bos_id(tokenizer)
    if bos is not None:
        windows[:, 0] = bos
    return windows


@dataclass(frozen=True)
class CalibrationSpec:
    """Which calibration windows to draw: ``nsamples`` × ``seqlen`` tokens of ``text``, by ``seed``."""

    text: CalibrationText
    nsamples: int
    seqlen: int
    seed: int = 0

    def windows(self, tokenizer) -> torch.Tensor:
        return calibration_windows(self.text, tokenizer, self.nsamples, self.seqlen, self.seed)

    def record(self) -> dict:
        return {"corpus": self.text.corpus, "part": self.text.part, "nsamples": self.nsamples,
                "seqlen": self.seqlen, "seed": self.seed}


SELF_GENERATED = (8, 256)  # windows × tokens: enough for a Fisher ranking of SmolLM2's 210 layers


@torch.no_grad()
def self_generated_windows(
    model, nsamples: int = SELF_GENERATED[0], seqlen: int = SELF_GENERATED[1], seed: int = 0
) -> torch.Tensor:
    """[nsamples, seqlen] token windows the model samples itself (temperature 1, no top-k/top-p),
    starting from BOS: calibration text without a dataset, drawn from the model's own distribution
    (as in LLM-QAT's data-free generation). The global RNG is left as it was."""
    config = getattr(model, "generation_config", None) or model.config
    bos, eos = (t[0] if isinstance(t, (list, tuple)) else t for t in (config.bos_token_id, config.eos_token_id))
    start = next((t for t in (bos, eos) if t is not None), 0)
    prompt = torch.full((nsamples, 1), start, dtype=torch.long)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        windows = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1, pad_token_id=eos,
        )
    return windows[:, :seqlen]
