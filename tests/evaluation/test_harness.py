"""lowbit as an lm-evaluation-harness backend, on a task defined from local files (no hub)."""

import json
import math
import subprocess
import sys

import pytest

from lowbit import api
from lowbit.data.corpora import evaluation_text
from lowbit.data.tasks import next_sentence_items
from lowbit.errors import LowbitError
from lowbit.evaluation import harness
from lowbit.evaluation.tasks import score_next_sentence
from lowbit.models.loader import load_model

pytestmark = pytest.mark.skipif(not harness.AVAILABLE, reason="lm-eval is not installed (pip install 'lowbit[lm-eval]')")

TASK = """task: local_nextsent
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    items = next_sentence_items(evaluation_text("austen"), 12, seed=5)
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps({"context": it.context, "endings": list(it.endings), "label": it.label}) + "\n"
                            for it in items))
    (folder / "local_nextsent.yaml").write_text(TASK.format(data=data))
    return folder, items


def test_lm_eval_scores_a_local_task_exactly_as_lowbit_s_own_engine(tiny_model_dir, local_task):
    folder, items = local_task
    result = api.evaluate(str(tiny_model_dir), ppl=None, tasks=("local_nextsent",), include_path=str(folder),
                          batch_size=5, progress=False)
    theirs = result.tasks["local_nextsent"]
    model, tokenizer, _ = load_model(str(tiny_model_dir))
    ours = score_next_sentence(model, tokenizer, items, "austen", 5)
    assert theirs["items"] == 12
    for metric in ("acc", "acc_norm"):
        assert theirs["metrics"][metric] == pytest.approx(ours.metrics[metric])
        assert theirs["stderr"][metric] == pytest.approx(ours.stderr[metric])


def test_rolling_loglikelihood_covers_every_token(tiny_model_dir):
    from lm_eval.api.instance import Instance

    model, tokenizer, _ = load_model(str(tiny_model_dir))
    lm = harness.LowbitLM("", model=model, tokenizer=tokenizer, max_length=16)
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = tokenizer(text, add_special_tokens=False).input_ids
    single = harness.LowbitLM("", model=model, tokenizer=tokenizer, max_length=len(ids) + 1)
    (whole,) = single.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert len(ids) > 16 and math.isfinite(total) and total < 0
    assert total <= whole + 1e-3  # shorter windows see less context: never more likely than one window


def test_generate_until_stops_at_the_first_stop_string(tiny_model_dir):
    from lm_eval.api.instance import Instance

    model, tokenizer, _ = load_model(str(tiny_model_dir))
    lm = harness.LowbitLM("", model=model, tokenizer=tokenizer)
    (free,) = lm.generate_until([Instance("generate_until", {}, ("It is a", {"max_gen_toks": 12}), 0)])
    stop = free[2:5]
    (cut,) = lm.generate_until([Instance("generate_until", {}, ("It is a", {"max_gen_toks": 12, "until": [stop]}), 0)])
    assert len(free) > 5 and cut == free[: free.index(stop)]


def test_a_hub_task_offline_fails_with_a_clear_message_before_the_model_loads(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(LowbitError, match="needs a network"):
        api.check_eval_inputs(None, 512, "float32", 4, ("arc_easy",))
    with pytest.raises(LowbitError, match="unknown task 'no_such_task'"):
        api.check_eval_inputs(None, 512, "float32", 4, ("no_such_task",))


def test_lm_eval_s_own_command_line_runs_lowbit(tiny_model_dir, local_task, tmp_path):
    folder, _ = local_task
    cmd = [sys.executable, "-m", "lowbit.evaluation.harness_cli", "--model", "lowbit", "--model_args",
           f"pretrained={tiny_model_dir}", "--tasks", "local_nextsent", "--include_path", str(folder),
           "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "local_nextsent" in done.stdout and "acc_norm" in done.stdout
