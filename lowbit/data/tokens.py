"""Tokenize long texts piece by piece, so memory stays proportional to the tokens, not the text."""

from __future__ import annotations

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


def token_stream(text: _Text, tokenizer) -> torch.Tensor:
    """All tokens of ``text`` (documents joined by a blank line) as one 1-D tensor, without special tokens."""
    ids: list[int] = []
    for i, document in enumerate(text.documents):
        for piece in _pieces(("\n\n" if i else "") + document):
            ids.extend(tokenizer(piece, add_special_tokens=False).input_ids)
    return torch.tensor(ids, dtype=torch.long)
