"""A study's inputs are refused before any work, and a row is reused exactly while its settings hold."""

import json
from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.study.plan import StudyPlan, check_plan
from lowbit.study.run import cached_row


@pytest.mark.parametrize("plan, message", [
    (StudyPlan(("smollm2-135m",), bits=(16, 5)), "got 5"),
    (StudyPlan(("smollm2-135m", "smollm2-135m")), "named twice"),
    (StudyPlan(("smollm2-135m",), method="nosuch"), "nosuch"),
    (StudyPlan(("smollm2-135m",), tasks=("hellaswag",)), "offline tasks"),
    (StudyPlan(("no/such/thing",)), "no model"),
])
def test_bad_plans_are_refused_with_one_line(plan, message):
    with pytest.raises(LowbitError, match=message):
        check_plan(plan)


def test_a_finished_row_is_reused_only_with_the_same_settings(tmp_path: Path):
    row = StudyPlan(("smollm2-135m",), bits=(4,), output=tmp_path).rows()[0]
    row.result_file.parent.mkdir(parents=True)
    row.result_file.write_text(json.dumps({"key": row.key, "eval": {}}))
    assert cached_row(row) is not None
    other = StudyPlan(("smollm2-135m",), bits=(4,), output=tmp_path, limit=50).rows()[0]
    assert other.result_file == row.result_file and other.key != row.key and cached_row(other) is None
    assert StudyPlan(("smollm2-135m",), bits=(4,), output=tmp_path, nsamples=64).rows()[0].key != row.key
    fp = StudyPlan(("smollm2-135m",), bits=(16,), output=tmp_path).rows()[0]
    assert fp.checkpoint is None and fp.runs == "smollm2-135m"
