"""End-to-end: the CLI exactly as a user types it."""

import json
import shutil
import subprocess

import pytest

LOWBIT = shutil.which("lowbit")
pytestmark = pytest.mark.skipif(LOWBIT is None, reason="the lowbit command is not installed")


def run(*args, cwd=None):
    return subprocess.run([LOWBIT, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_clean_failure(done, message):
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr


def test_help_names_the_jobs():
    done = run("--help")
    assert done.returncode == 0
    assert "quantize" in done.stdout and "eval" in done.stdout


def test_quantize_then_eval_a_tiny_model(tiny_model_dir, tmp_path, text_file):
    out = tmp_path / "q"
    done = run("quantize", tiny_model_dir, "-o", out, "--method", "gptq", "--bits", "4", "--group-size", "32",
               "--calib", text_file, "--nsamples", "4", "--seqlen", "32", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["method"] == "gptq" and summary["bits_per_weight"] > 4
    done = run("eval", out, tiny_model_dir, "--ppl", text_file, "--seqlen", "32", "--json")
    assert done.returncode == 0, done.stderr
    quantized, full = json.loads(done.stdout)
    assert quantized["quantized"] and not full["quantized"]
    assert quantized["perplexity"] > 1 and full["perplexity"] > 1
    assert quantized["size_bytes"] < full["size_bytes"]


def test_table_output_is_readable(tiny_model_dir, text_file):
    done = run("eval", tiny_model_dir, "--ppl", text_file, "--seqlen", "32")
    assert done.returncode == 0, done.stderr
    assert "perplexity" in done.stdout and "peak RSS" in done.stdout


def test_unsupported_bits(tiny_model_dir, tmp_path):
    assert_clean_failure(run("quantize", tiny_model_dir, "-o", tmp_path / "q", "--bits", "5"), "5-bit")


def test_bad_group_size(tiny_model_dir, tmp_path):
    assert_clean_failure(run("quantize", tiny_model_dir, "-o", tmp_path / "q", "--group-size", "-3"), "group size")


def test_existing_output_folder_is_kept(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    assert_clean_failure(run("quantize", tiny_model_dir, "-o", out, "--method", "rtn"), "--overwrite")
    assert (out / "mine.txt").read_text() == "mine"


def test_missing_model(tmp_path):
    assert_clean_failure(run("eval", tmp_path / "no-model"), "no model")


def test_empty_calibration_text(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_clean_failure(
        run("quantize", tiny_model_dir, "-o", tmp_path / "q", "--calib", empty, "--seqlen", "32"), "too short"
    )
    assert not (tmp_path / "q").exists()


def test_hub_id_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_clean_failure(run("eval", "someorg/not-a-cached-model"), "use it offline")


def test_unknown_method(tiny_model_dir, tmp_path):
    assert_clean_failure(run("quantize", tiny_model_dir, "-o", tmp_path / "q", "--method", "magic"), "unknown method")


def test_chat_through_a_pipe(tiny_model_dir):
    done = subprocess.run([LOWBIT, "chat", str(tiny_model_dir), "--max-tokens", "5", "--quantization", "int4"],
                          input="hello\n/reset\nagain\n/exit\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("assistant> ") == 2 and "(conversation cleared)" in done.stdout


def test_bench_reports_speeds_as_json(tiny_model_dir):
    done = run("bench", tiny_model_dir, "--quantization", "int4", "--prompt-tokens", "32", "--decode-tokens", "8",
               "--repeats", "2", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["prefill_tok_s_median"] > 0 and result["decode_tok_s_median"] > 0
    assert result["decode_tok_s_max"] >= result["decode_tok_s_median"] and result["threads"] >= 1
    assert result["kv_cache_bytes"] > 0 and result["resident_weights_bytes"] > 0


def test_serve_refuses_unknown_quantization(tiny_model_dir):
    assert_clean_failure(run("serve", tiny_model_dir, "--quantization", "int3"), "int3")


def test_asymmetric_low_bit_checkpoints_say_which_consumer_cannot_read_them(tiny_model_dir, tmp_path):
    done = run("quantize", tiny_model_dir, "-o", tmp_path / "q", "--method", "rtn", "--bits", "4",
               "--group-size", "32", "--asym", "--json")
    assert done.returncode == 0, done.stderr
    assert any("cannot load asymmetric" in note for note in json.loads(done.stdout)["notes"])


def test_compress_prints_the_bit_width_distribution(tiny_model_dir, tmp_path):
    out = tmp_path / "mixed"
    done = run("compress", tiny_model_dir, "-o", out, "--mode", "int4_asym", "--group-size", "32", "--ratio", "0.6",
               "--method", "hqq")
    assert done.returncode == 0, done.stderr
    assert "bit-width distribution" in done.stdout and "int8" in done.stdout and "int4 asym g32" in done.stdout
    assert (out / "config.json").is_file()
    done = run("compress", tiny_model_dir, "-o", tmp_path / "nf4", "--mode", "nf4", "--group-size", "32", "--json")
    rows = {row["scheme"].split()[0]: row for row in json.loads(done.stdout)["distribution"]}
    assert rows["nf4"]["ratio_defining_pct"] == 100 and rows["int8"]["ratio_defining_pct"] == 0  # int8: embeddings


@pytest.mark.parametrize(
    "argv, message",
    [(["--mode", "int5"], "mode 'int5'"), (["--ratio", "1.5"], "ratio"), (["--method", "gptq"], "data-free")],
)
def test_compress_bad_options_fail_cleanly(tiny_model_dir, tmp_path, argv, message):
    out = tmp_path / "never"
    assert_clean_failure(run("compress", tiny_model_dir, "-o", out, *argv), message)
    assert not out.exists()


def test_ternary_with_the_wrong_bit_width_fails_cleanly(tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    assert_clean_failure(run("quantize", tiny_model_dir, "-o", out, "--method", "ternary", "--bits", "4"), "--bits 2")
    assert not out.exists()
