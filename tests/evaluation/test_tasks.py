"""Accuracy and its standard error, aggregated as lm-evaluation-harness does."""

import json
import math
import subprocess
import sys

import pytest

from lowbit.api import check_eval_inputs
from lowbit.data.tasks import ChoiceItem, LastWordItem
from lowbit.errors import LowbitError
from lowbit.evaluation import tasks
from lowbit.evaluation.loglikelihood import Scored


def test_the_standard_error_of_an_accuracy_is_sqrt_p_1_minus_p_over_n_minus_1():
    hits = [1.0] * 30 + [0.0] * 70
    assert tasks.mean_stderr(hits) == pytest.approx(math.sqrt(0.3 * 0.7 / 99))
    assert math.isnan(tasks.mean_stderr([1.0]))


def test_acc_takes_the_likeliest_ending_and_acc_norm_the_likeliest_per_character(monkeypatch):
    items = [ChoiceItem("ctx", ("short", "a much longer ending", "mid ending", "other"), label=1),
             ChoiceItem("ctx", ("one", "two", "three", "four"), label=0)]
    lls = [-5.0, -8.0, -9.0, -7.0,  # raw: "short" wins; per character: the long one (-8/20)
           -1.0, -2.0, -3.0, -4.0]
    monkeypatch.setattr(tasks, "loglikelihoods", lambda *a, **k: [Scored(v, False, False, 1) for v in lls])
    result = tasks.score_next_sentence(None, None, items, "t", 4)
    assert result.metrics == {"acc": 0.5, "acc_norm": 1.0}
    assert result.items == 2


def test_last_word_reports_both_scorings(monkeypatch):
    items = [LastWordItem("c", "word")] * 4
    scored = [Scored(-1, True, True, 2), Scored(-1, False, True, 2), Scored(-1, False, False, 2), Scored(-1, False, True, 1)]
    monkeypatch.setattr(tasks, "loglikelihoods", lambda *a, **k: scored)
    result = tasks.score_last_word(None, None, items, "t", 4)
    assert result.metrics == {"acc": 0.25, "acc_last": 0.75}
    assert result.stderr["acc"] == pytest.approx(math.sqrt(0.25 * 0.75 / 3))


def test_eval_with_tasks_from_the_command_line(tiny_model_dir):
    cmd = [sys.executable, "-m", "lowbit.cli.main", "eval", str(tiny_model_dir), "--ppl", "austen",
           "--max-tokens", "2048", "--tasks", "lambada,nextsent", "--limit", "40", "--batch-size", "16", "--json"]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    assert set(result["tasks"]) == {"lambada", "nextsent"}
    for name, metrics in (("lambada", {"acc", "acc_last"}), ("nextsent", {"acc", "acc_norm"})):
        task = result["tasks"][name]
        assert set(task["metrics"]) == metrics and task["corpus"] == "austen" and task["items"] == 40
        for m, p in task["metrics"].items():
            assert task["stderr"][m] == pytest.approx(math.sqrt(p * (1 - p) / (task["items"] - 1)))
    assert 0 < result["bits_per_byte"] < 20 and result["word_perplexity"] > result["perplexity"]


def test_unknown_tasks_and_tasks_without_text_are_refused_before_loading():
    done = subprocess.run([sys.executable, "-m", "lowbit.cli.main", "eval", "/nonexistent", "--tasks", "no_such_task"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "unknown task 'no_such_task'" in done.stderr and "lambada, nextsent" in done.stderr
    with pytest.raises(LowbitError, match="pass --ppl TEXT"):
        check_eval_inputs(None, 512, "float32", 4, ("lambada",))
