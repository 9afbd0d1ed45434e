"""Offline task items built from held-out text: a fixed, seeded construction, documented sizes.

*last word* (LAMBADA-style): a passage of consecutive sentences (``LAST_WORD_WORDS`` words or
more) whose final word is to be predicted from the context. As LAMBADA selects words that need
the broad context, the final word (alphabetic, ``MIN_TARGET_LETTERS`` letters or more) must also
occur earlier in the passage. These are not LAMBADA's human-filtered passages: the filter is that
rule, not people who could guess the word only from the whole passage.

*next sentence* (HellaSwag-like): ``CONTEXT_SENTENCES`` consecutive sentences, then four endings:
the true next sentence and three distractors drawn from elsewhere in the same work (at least
``DISTRACTOR_GAP`` sentences away), each of a length within ``LENGTH_TOLERANCE`` of the true one.

Only an :class:`EvaluationText` is accepted: items are never built from calibration text.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from lowbit.data.corpora import EvaluationText
from lowbit.errors import LowbitError

LAST_WORD_ITEMS = 400
LAST_WORD_WORDS = 60
LAST_WORD_MAX_WORDS = 150
MIN_TARGET_LETTERS = 3
NEXT_SENTENCE_ITEMS = 200
CONTEXT_SENTENCES = 3
CONTEXT_MAX_WORDS = 90
ENDING_WORDS = (6, 40)
DISTRACTOR_GAP = 50
LENGTH_TOLERANCE = 0.25
DISTRACTORS = 3

_ABBREVIATIONS = ("Mr", "Mrs", "Dr", "St", "Col", "Capt", "Gen", "Rev", "Messrs", "Sir", "Esq", "Mme", "Mlle")
_BOUNDARY = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)]))\s+(?=[\"'“‘(]?[A-Z])")
_TARGET = re.compile(r"^(.*\S)\s+([A-Za-z]+)[.!?;:,\"'”’)]*$", re.S)


@dataclass(frozen=True)
class LastWordItem:
    context: str  # the passage up to the final word, without the space before it
    target: str  # the final word, without punctuation


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    endings: tuple[str, ...]  # each scored as " " + ending after the context
    label: int  # index of the true ending


def sentences(document: str) -> list[str]:
    """The document's sentences, whitespace normalised, paragraphs kept apart, abbreviations respected."""
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", document):
        text = " ".join(paragraph.split())
        if not text:
            continue
        pieces = _BOUNDARY.split(text)
        merged: list[str] = []
        for piece in pieces:
            if merged and merged[-1].rsplit(" ", 1)[-1].rstrip(".") in _ABBREVIATIONS:
                merged[-1] += " " + piece
            else:
                merged.append(piece)
        out.extend(merged)
    return out


def _need_items(kind: str, found: int, wanted: int, text: EvaluationText) -> None:
    if found < wanted:
        raise LowbitError(
            f"{text.corpus}'s held-out part gives {found} {kind} items, fewer than the {wanted} asked for;"
            " give a longer text or ask for fewer"
        )


def last_word_items(text: EvaluationText, n: int = LAST_WORD_ITEMS, seed: int = 0) -> list[LastWordItem]:
    """``n`` last-word passages of ``text`` (see the module docstring), in text order."""
    _check(text)
    candidates = []
    for document in text.documents:
        sents = sentences(document)
        for k in range(len(sents)):
            j, words = k, len(sents[k].split())
            while words < LAST_WORD_WORDS and j > 0:
                j -= 1
                words += len(sents[j].split())
            if words < LAST_WORD_WORDS or words > LAST_WORD_MAX_WORDS:
                continue
            match = _TARGET.match(" ".join(sents[j : k + 1]))
            if not match or len(match.group(2)) < MIN_TARGET_LETTERS:
                continue
            context, target = match.group(1), match.group(2)
            if re.search(rf"\b{target}\b", context, re.IGNORECASE):
                candidates.append(LastWordItem(context, target))
    _need_items("last-word", len(candidates), n, text)
    chosen = sorted(random.Random(seed).sample(range(len(candidates)), n))
    return [candidates[i] for i in chosen]


def next_sentence_items(text: EvaluationText, n: int = NEXT_SENTENCE_ITEMS, seed: int = 0) -> list[ChoiceItem]:
    """``n`` four-way next-sentence items of ``text`` (see the module docstring), in text order."""
    _check(text)
    rng = random.Random(seed)
    candidates = []
    for document in text.documents:
        sents = sentences(document)
        lengths = [len(s) for s in sents]
        for k in range(CONTEXT_SENTENCES, len(sents)):
            context = " ".join(sents[k - CONTEXT_SENTENCES : k])
            if len(context.split()) > CONTEXT_MAX_WORDS or not ENDING_WORDS[0] <= len(sents[k].split()) <= ENDING_WORDS[1]:
                continue
            near = [i for i in range(len(sents)) if abs(i - k) >= DISTRACTOR_GAP
                    and abs(lengths[i] - lengths[k]) <= LENGTH_TOLERANCE * lengths[k] and sents[i] != sents[k]]
            if len(near) >= DISTRACTORS:
                candidates.append((context, sents[k], near, sents))
    _need_items("next-sentence", len(candidates), n, text)
    items = []
    for i in sorted(rng.sample(range(len(candidates)), n)):
        context, true, near, sents = candidates[i]
        endings = [true] + [sents[j] for j in rng.sample(near, DISTRACTORS)]
        order = list(range(len(endings)))
        rng.shuffle(order)
        items.append(ChoiceItem(context, tuple(endings[o] for o in order), order.index(0)))
    return items


def _check(text) -> None:
    if not isinstance(text, EvaluationText):
        raise TypeError("task items are built from an EvaluationText (see lowbit.data.corpora.evaluation_text)")
