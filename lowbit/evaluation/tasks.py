"""Task accuracy with its standard error, on the offline tasks of :mod:`lowbit.data.tasks`.

    lambada   acc       every token of " " + word is the greedy choice (lm-eval's LAMBADA metric)
              acc_last  the word's last token is the argmax given all before it (Neural Compressor's)
    nextsent  acc       the true ending has the highest log-likelihood of the four
              acc_norm  the highest log-likelihood per character of the ending (lm-eval's acc_norm)

Standard error of a mean over n items (lm-eval's ``mean_stderr``): s / √n, s the sample standard
deviation; for an accuracy p that is √(p(1 − p) / (n − 1)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from lowbit.data.corpora import EvaluationText
from lowbit.data.tasks import (
    LAST_WORD_ITEMS,
    NEXT_SENTENCE_ITEMS,
    ChoiceItem,
    LastWordItem,
    last_word_items,
    next_sentence_items,
)
from lowbit.errors import LowbitError
from lowbit.evaluation.loglikelihood import loglikelihoods


@dataclass(frozen=True)
class TaskResult:
    task: str
    corpus: str
    items: int
    metrics: dict[str, float]
    stderr: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def mean_stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def plus_minus(value: float, stderr: float) -> str:
    """"0.412 ± 0.025": an accuracy with its standard error."""
    return f"{value:.3f} ± {stderr:.3f}"


def _result(task: str, corpus: str, hits: dict[str, list[bool]]) -> TaskResult:
    n = len(next(iter(hits.values())))
    metrics = {k: sum(v) / n for k, v in hits.items()}
    return TaskResult(task, corpus, n, metrics, {k: mean_stderr([float(x) for x in v]) for k, v in hits.items()})


def score_last_word(model, tokenizer, items: list[LastWordItem], corpus: str, batch_size: int,
                    on_batch: Optional[Callable] = None) -> TaskResult:
    scored = loglikelihoods(model, tokenizer, [(it.context, " " + it.target) for it in items], batch_size,
                            on_batch=on_batch)
    return _result("lambada", corpus, {"acc": [s.greedy for s in scored], "acc_last": [s.last_greedy for s in scored]})


def score_next_sentence(model, tokenizer, items: list[ChoiceItem], corpus: str, batch_size: int,
                        on_batch: Optional[Callable] = None) -> TaskResult:
    requests = [(it.context, " " + ending) for it in items for ending in it.endings]
    scored = iter(loglikelihoods(model, tokenizer, requests, batch_size, on_batch=on_batch))
    acc, acc_norm = [], []
    for it in items:
        lls = [next(scored).loglikelihood for _ in it.endings]
        per_char = [ll / len(ending) for ll, ending in zip(lls, it.endings)]
        acc.append(max(range(len(lls)), key=lls.__getitem__) == it.label)
        acc_norm.append(max(range(len(lls)), key=per_char.__getitem__) == it.label)
    return _result("nextsent", corpus, {"acc": acc, "acc_norm": acc_norm})


@dataclass(frozen=True)
class Task:
    name: str
    summary: str
    build: Callable[[EvaluationText, int, Optional[int]], list]  # (text, seed, items or None: the default) -> items
    score: Callable[..., TaskResult]


TASKS = {
    t.name: t
    for t in (
        Task("lambada", "last word of a passage, LAMBADA-style (acc, acc_last)",
             lambda text, seed, n: last_word_items(text, n or LAST_WORD_ITEMS, seed), score_last_word),
        Task("nextsent", "next sentence among four, HellaSwag-like (acc, acc_norm)",
             lambda text, seed, n: next_sentence_items(text, n or NEXT_SENTENCE_ITEMS, seed), score_next_sentence),
    )
}


def get_tasks(names: list[str]) -> list[Task]:
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise LowbitError(f"unknown task {unknown[0]!r}; offline tasks: {', '.join(TASKS)}")
    return [TASKS[n] for n in names]
