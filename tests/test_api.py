"""What the library refuses before it loads a model (a load takes 10–60 s on the real ones)."""

import pytest

import lowbit
import lowbit.api as api
from lowbit.errors import LowbitError


@pytest.fixture()
def no_loading(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(api, "load_model", refuse)


def test_a_missing_calibration_file_is_reported_before_the_model_loads(tiny_model_dir, tmp_path, no_loading):
    with pytest.raises(LowbitError, match="missing.txt"):
        lowbit.quantize(str(tiny_model_dir), method="gptq", calib=str(tmp_path / "missing.txt"), progress=False)
    with pytest.raises(LowbitError, match="missing.txt"):
        lowbit.compress(str(tiny_model_dir), dataset=str(tmp_path / "missing.txt"), ratio=0.5, progress=False)


def test_a_missing_evaluation_file_is_reported_before_the_model_loads(tiny_model_dir, tmp_path, no_loading):
    with pytest.raises(LowbitError, match="missing.txt"):
        lowbit.evaluate(str(tiny_model_dir), ppl=str(tmp_path / "missing.txt"), progress=False)


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"seqlen": 1}, {"dtype": "int8"}])
def test_bad_evaluation_options_are_reported_before_the_model_loads(tiny_model_dir, no_loading, kwargs):
    with pytest.raises(LowbitError):
        lowbit.evaluate(str(tiny_model_dir), **kwargs)
