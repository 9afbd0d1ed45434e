"""End-to-end on the real packaged model, typed as a user would."""

import json

import pytest

from .test_cli import LOWBIT, run

pytestmark = [pytest.mark.integration, pytest.mark.skipif(LOWBIT is None, reason="lowbit is not installed")]


def test_gptq_g128_on_smollm2_reports_the_fallback_and_evaluates(tmp_path):
    out = tmp_path / "smol-w4"
    done = run("quantize", "smollm2-135m", "-o", out, "--method", "gptq", "--bits", "4", "--group-size", "128",
               "--calib", "shakespeare", "--nsamples", "8", "--seqlen", "128")
    assert done.returncode == 0, done.stderr
    assert "group-size fallback" in done.stdout and "does not divide 576" in done.stdout
    recipe = json.loads((out / "lowbit_recipe.json").read_text())
    assert recipe["calibration"] == {"corpus": "shakespeare", "part": "calibration", "nsamples": 8, "seqlen": 128,
                                     "seed": 0}
    done = run("eval", out, "--ppl", "austen", "--max-tokens", "1024", "--json")
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    assert result["quantized"] and 20 < result["perplexity"] < 100
    assert result["recipe"]["method"] == "gptq"
