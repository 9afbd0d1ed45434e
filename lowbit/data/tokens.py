"""Tokenize long texts piece by piece, so memory stays proportional to the tokens, not the text."""

from __future__ import annotations

from typing import Optional

import torch

from lowbit.data.corpora import _Text

PIECE_CHARS = 50_000


def _pieces(document: str):
    """Cut a document at line breaks into pieces of about ``PIECE_CHARS`` characters."""
    start = 0
    while start < len(document):
        end = min(start + PIECE_CHARS, len(document))
        if end < len(document):
            cut = document.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield document[start:end]
        start = end


def tokenize_text(text: _Text, tokenizer) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """All tokens of ``text`` (documents joined by a blank line) as one 1-D tensor, without special
    tokens, and for each token the index in ``text.text`` just after its last character (None for a
    tokenizer without offsets, i.e. not a "fast" one)."""
    fast = getattr(tokenizer, "is_fast", False)
    ids: list[int] = []
    ends: list[int] = []
    start = 0
    for i, document in enumerate(text.documents):
        for piece in _pieces(("\n\n" if i else "") + document):
            encoded = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=fast)
            ids.extend(encoded.input_ids)
            if fast:
                ends.extend(start + end for _, end in encoded.offset_mapping)
            start += len(piece)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(ends, dtype=torch.long) if fast else None


def token_stream(text: _Text, tokenizer) -> torch.Tensor:
    """The tokens of :func:`tokenize_text` alone."""
    return tokenize_text(text, tokenizer)[0]


def bos_id(tokenizer) -> Optional[int]:
    """BOS when the tokenizer itself puts it at the start of a text (Llama-2, Gemma do; SmolLM2 does not), else None."""
    probe = tokenizer("a", add_special_tokens=True).input_ids
    return tokenizer.bos_token_id if probe and probe[0] == tokenizer.bos_token_id else None
