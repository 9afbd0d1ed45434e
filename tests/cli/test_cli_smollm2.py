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


def test_a_calibrated_fp8_kv_cache_is_saved_benched_and_evaluated_by_default(tmp_path):
    """The checkpoint's fp8 cache is what bench and eval run unless told otherwise; its static scales (the max over
    calibration text) cost little perplexity against the bf16 cache."""
    out = tmp_path / "smol-w4-kv8"
    done = run("quantize", "smollm2-135m", "-o", out, "--method", "rtn", "--bits", "4", "--group-size", "64",
               "--kv-cache", "fp8", "--calib", "shakespeare", "--nsamples", "8", "--seqlen", "128")
    assert done.returncode == 0, done.stderr
    scales = json.loads((out / "lowbit_recipe.json").read_text())["kv_cache_scales"]
    assert len(scales) == 30 and all(k > 0 and v > 0 for k, v in scales.values())
    bench = run("bench", out, "--prompt-tokens", "64", "--decode-tokens", "8", "--repeats", "1", "--json")
    assert bench.returncode == 0, bench.stderr
    result = json.loads(bench.stdout)
    assert result["kernels"]["KV cache"] == "fp8 (calibrated static scales)"
    assert result["kernels"]["decode step"].startswith("compiled")
    assert result["kv_cache_bytes_per_token"] == 30 * 3 * 2 * 64  # one byte per value, no per-position scales
    evals = [run("eval", out, "--ppl", "austen", "--max-tokens", "1024", "--json", *extra)
             for extra in ((), ("--kv-cache", "bf16"))]
    assert all(e.returncode == 0 for e in evals), evals[0].stderr + evals[1].stderr
    (fp8,), (bf16,) = (json.loads(e.stdout) for e in evals)
    assert (fp8["kv_cache"], bf16["kv_cache"]) == ("fp8 static", "bf16")
    assert fp8["perplexity"] != bf16["perplexity"] and abs(fp8["perplexity"] / bf16["perplexity"] - 1) < 0.02


@pytest.mark.slow  # ~4 minutes: two rows, each quantized, evaluated and run in its own processes
def test_study_of_two_widths_writes_its_report_and_a_rerun_reuses_every_row(tmp_path):
    out = tmp_path / "study"
    args = ("study", "smollm2-135m", "--bits", "16,4", "--method", "rtn", "--max-tokens", "1024", "--limit", "4",
            "-o", out)
    done = run(*args)
    assert done.returncode == 0, done.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith("| smollm2-135m")]
    assert [line.split(" | ")[1] for line in table] == ["full precision", "rtn W4 g64"]
    assert all("±" in line for line in table)  # every accuracy with its standard error
    study = json.loads((out / "study.json").read_text())
    fp, w4 = study["rows"]
    assert fp["eval"]["tasks"]["lambada"]["items"] == 4 and fp["eval"]["eval_tokens"] >= 1000
    assert 1.0 < fp["eval"]["bits_per_byte"] < w4["eval"]["bits_per_byte"] < 2.0
    assert w4["bench"]["model_peak_bytes"] < fp["bench"]["model_peak_bytes"]
    assert any(line.startswith("From ") for line in study["conclusions"])
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "lowbit quantize smollm2-135m" in page
    again = run(*args)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("finished earlier with the same settings, reused") == 2
    assert json.loads((out / "study.json").read_text())["rows"] == study["rows"]


def test_quantize_writes_a_gguf_that_reads_back_as_the_model_it_quantized(tmp_path):
    """`quantize --gguf Q4_0`: every decoder linear in Q4_0, the embedding table in Q8_0 and the norms in float32, as
    in the shipped llama.cpp file; its architecture keys and tokenizer (vocabulary, merges, pre-tokenizer, chat
    template) are the shipped file's; transformers' GGUF reader (which undoes the q/k row order) evaluates it, and
    `bench` runs its Q4_0 codes on lowbit's 4-bit kernels."""
    from collections import Counter

    from gguf import GGUFReader

    from lowbit.formats.gguf.metadata import tokenizer_fields
    from lowbit.models.loader import gguf_tokenizer_file

    out = tmp_path / "smol-q4_0.gguf"
    done = run("quantize", "smollm2-135m", "-o", out, "--method", "rtn", "--gguf", "Q4_0", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["scheme"] == "GGUF Q4_0" and summary["bits_per_weight"] == 4.5
    shipped_path = gguf_tokenizer_file("smollm2-135m")
    mine, shipped = GGUFReader(out), GGUFReader(shipped_path)
    assert Counter(t.tensor_type.name for t in mine.tensors) == {"Q4_0": 210, "F32": 61, "Q8_0": 1}
    assert {t.name for t in mine.tensors} == {t.name for t in shipped.tensors}
    shared = [k for k in shipped.fields if k.startswith("llama.")]
    assert len(shared) == 10 and all(mine.fields[k].contents() == shipped.fields[k].contents() for k in shared)
    assert tokenizer_fields(out) == tokenizer_fields(shipped_path)
    done = run("eval", out, "--ppl", "austen", "--max-tokens", "1024", "--json")
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    assert 20 < result["perplexity"] < 60  # full precision 23.2 on this text; RTN W4 g32 costs a little, not 10x
    done = run("bench", out, "--prompt-tokens", "32", "--decode-tokens", "8", "--repeats", "1", "--json")
    assert done.returncode == 0, done.stderr
    speed = json.loads(done.stdout)  # the file's own codes on lowbit's 4-bit kernels, not a float32 model
    assert speed["quantization"] == "gguf Q4_0" and "4-bit GEMV" in speed["kernels"]["gate_up"]
    assert "do not read" not in done.stderr

