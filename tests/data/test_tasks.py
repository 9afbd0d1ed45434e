"""Offline task items: seeded, built from held-out text only, each item what its task says it is."""

import re
from collections import Counter

import pytest

from lowbit.data import tasks
from lowbit.data.corpora import calibration_text, evaluation_text
from lowbit.errors import LowbitError


@pytest.fixture(scope="module")
def austen():
    return evaluation_text("austen")


def _flat(text) -> str:
    return " ".join(" ".join(text.documents).split())


def test_sentences_respect_abbreviations_and_paragraphs():
    doc = 'Mr. Elliot came. "Was it Mrs. Smith?" she asked.\n\nAnother paragraph without an end'
    assert tasks.sentences(doc) == ["Mr. Elliot came.", '"Was it Mrs. Smith?" she asked.', "Another paragraph without an end"]


def test_last_word_passages_end_with_a_word_the_context_already_holds(austen):
    items = tasks.last_word_items(austen)
    assert len(items) == tasks.LAST_WORD_ITEMS
    flat = _flat(austen)
    for it in items:
        assert re.fullmatch(r"[A-Za-z]{3,}", it.target)
        assert re.search(rf"\b{it.target}\b", it.context, re.IGNORECASE)
        assert it.context + " " + it.target in flat  # a real passage of the held-out text
        assert tasks.LAST_WORD_WORDS <= len(it.context.split()) + 1 <= tasks.LAST_WORD_MAX_WORDS


def test_items_are_fixed_by_the_seed(austen):
    assert tasks.last_word_items(austen, 50, seed=0) == tasks.last_word_items(austen, 50, seed=0)
    assert tasks.last_word_items(austen, 50, seed=0) != tasks.last_word_items(austen, 50, seed=1)
    assert tasks.next_sentence_items(austen, 20, seed=3) == tasks.next_sentence_items(austen, 20, seed=3)


def test_next_sentence_items_hold_the_true_sentence_and_three_far_distractors_of_its_length(austen):
    items = tasks.next_sentence_items(austen)
    assert len(items) == tasks.NEXT_SENTENCE_ITEMS
    flat = _flat(austen)
    sents = tasks.sentences(austen.documents[0])
    position = {s: i for i, s in enumerate(sents)}
    for it in items:
        true = it.endings[it.label]
        assert it.context + " " + true in flat
        assert len(set(it.endings)) == 4
        for j, ending in enumerate(it.endings):
            assert ending in position  # drawn from the same work
            if j != it.label:
                assert abs(len(ending) - len(true)) <= tasks.LENGTH_TOLERANCE * len(true)
                assert abs(position[ending] - position[true]) >= tasks.DISTRACTOR_GAP
    labels = Counter(it.label for it in items)
    assert set(labels) == {0, 1, 2, 3} and max(labels.values()) < 0.4 * len(items)  # the answer's place is random


def test_calibration_text_is_refused_and_a_short_text_says_so(text_file):
    with pytest.raises(TypeError):
        tasks.last_word_items(calibration_text("austen"))
    with pytest.raises(LowbitError, match="fewer than the 400 asked for"):
        tasks.last_word_items(evaluation_text(str(text_file)))
