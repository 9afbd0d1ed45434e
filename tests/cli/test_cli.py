"""End-to-end: the CLI exactly as a user types it."""

import json
import shutil
import subprocess

import pytest
import safetensors.torch as safetensors_torch

import lowbit

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
    for row, model in ((quantized, out), (full, tiny_model_dir)):  # what the CLI prints is what was computed
        reference = lowbit.evaluate(str(model), ppl=str(text_file), seqlen=32, progress=False)
        assert row["perplexity"] == pytest.approx(reference.perplexity, rel=1e-5)
    assert quantized["perplexity"] != full["perplexity"]
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
    assert (result["prompt_tokens"], result["decode_tokens"], result["repeats"]) == (32, 8, 2)
    # the cache the run needs (2 layers, K and V, 2 KV heads of 24, 32 + 8 positions) in bfloat16
    assert result["kv_cache_bytes"] == 2 * 2 * 2 * 24 * (32 + 8) * 2
    fp32_bytes = sum(t.numel() * 4 for t in safetensors_torch.load_file(tiny_model_dir / "model.safetensors").values())
    assert result["resident_weights_bytes"] < fp32_bytes / 3  # int4 body, int8 tied head
    parts = result["memory_parts"]
    assert (parts["weights"], parts["kv_cache"]) == (result["resident_weights_bytes"], result["kv_cache_bytes"])
    # the run's peak is explained: RSS after load is runtime + weights + cache + other, the peak adds activations
    assert parts["runtime"] + parts["weights"] + parts["kv_cache"] + parts["other"] == result["rss_after_load_bytes"]
    if result["run_peak_exact"]:
        assert parts["activations"] == max(0, result["run_peak_rss_bytes"] - result["rss_after_load_bytes"])
    assert result["peak_rss_bytes"] == max(result["load_peak_rss_bytes"], result["run_peak_rss_bytes"])
    assert result["model_peak_bytes"] == result["peak_rss_bytes"] - parts["runtime"]


def test_bench_with_an_int8_kv_cache_counts_its_bytes_and_names_the_slower_decode_loop(tiny_model_dir):
    done = run("bench", tiny_model_dir, "--kv-cache", "int8", "--prompt-tokens", "32", "--decode-tokens", "8",
               "--repeats", "1", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # 2 layers, K and V, 2 KV heads, 40 positions: 24 int8 codes and a float16 scale each
    assert result["kv_cache_bytes"] == 2 * 2 * 2 * (32 + 8) * (24 + 2)
    assert result["kernels"]["KV cache"] == "int8 (dynamic scales)"
    assert result["kv_cache_bytes_per_token"] == 2 * 2 * 2 * (24 + 2)


def test_bench_decodes_at_each_depth_asked_and_refuses_a_bad_one(tiny_model_dir):
    done = run("bench", tiny_model_dir, "--kv-cache", "int4", "--prompt-tokens", "16", "--decode-tokens", "4",
               "--repeats", "1", "--depth", "200,70", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [d["depth"] for d in result["depths"]] == [70, 200] and all(d["decode_tok_s_median"] > 0 for d in result["depths"])
    assert result["kernels"]["decode step"].startswith("compiled") or result["notices"]
    assert_clean_failure(run("bench", tiny_model_dir, "--depth", "2k"), "--depth")
    assert_clean_failure(run("bench", tiny_model_dir, "--prompt-tokens", "16", "--depth", "250", "--decode-tokens", "8"),
                         "a prompt or depth of 250 plus 8 decoded tokens needs a context of 258 tokens, beyond the"
                         " model's 256")


def test_an_unknown_kv_cache_is_refused_before_loading(tiny_model_dir):
    assert_clean_failure(run("chat", tiny_model_dir, "--kv-cache", "q4_0"), "unknown KV cache format 'q4_0'")


def test_serve_refuses_unknown_quantization(tiny_model_dir):
    assert_clean_failure(run("serve", tiny_model_dir, "--quantization", "int3"), "int3")


def test_asymmetric_low_bit_checkpoints_say_which_consumer_cannot_read_them(tiny_model_dir, tmp_path):
    done = run("quantize", tiny_model_dir, "-o", tmp_path / "q", "--method", "rtn", "--bits", "4",
               "--group-size", "32", "--asym", "--json")
    assert done.returncode == 0, done.stderr
    assert any("cannot load asymmetric" in note for note in json.loads(done.stdout)["notes"])


def test_a_gguf_file_carries_no_checkpoint_consumer_notes(tiny_model_dir, tmp_path):
    """Q4_1 is searched on lowbit's asymmetric int4 grid, but the file holds llama.cpp's type, which transformers'
    compressed-tensors loader never reads: the asymmetric-checkpoint note would describe another file."""
    done = run("quantize", tiny_model_dir, "-o", tmp_path / "q.gguf", "--method", "rtn", "--gguf", "Q4_1", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["scheme"] == "GGUF Q4_1" and summary["notes"] == []


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


def test_an_output_under_a_file_is_refused_before_the_model_loads(tiny_model_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert_clean_failure(run("quantize", tiny_model_dir, "-o", tmp_path / "notes.txt" / "q", "--method", "rtn"),
                         "is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_already_quantized_checkpoint_is_not_quantized_again(tiny_model_dir, tmp_path):
    done = run("quantize", tiny_model_dir, "-o", tmp_path / "q", "--method", "rtn", "--group-size", "32")
    assert done.returncode == 0, done.stderr
    for job in ("quantize", "compress"):
        out = tmp_path / f"again-{job}"
        assert_clean_failure(run(job, tmp_path / "q", "-o", out), "already a quantized checkpoint")
        assert not out.exists()


def test_a_group_size_no_layer_can_take_is_refused_rather_than_relabelled(tiny_model_dir, tmp_path):
    for job in ("quantize", "compress"):
        assert_clean_failure(run(job, tiny_model_dir, "-o", tmp_path / "q", "--group-size", "7"), "at least 8")


def test_compress_reports_and_records_group_size_fallbacks(tiny_model_dir, tmp_path):
    out = tmp_path / "c"  # hidden 96: group 64 divides neither 96 nor q/k/v/o's width, 32 does
    done = run("compress", tiny_model_dir, "-o", out, "--mode", "int4_sym", "--group-size", "64", "--json")
    assert done.returncode == 0, done.stderr
    recipe = json.loads((out / "lowbit_recipe.json").read_text())
    for notices in (json.loads(done.stdout)["fallbacks"], recipe["group_size_fallbacks"]):
        assert any(f.startswith("q_proj: group size 64 does not divide 96: int4 sym g32") for f in notices)
        assert not any(f.startswith("down_proj") for f in notices)  # 128 wide: g64 fits


def test_eval_refuses_a_zero_batch_size(tiny_model_dir, text_file):
    assert_clean_failure(run("eval", tiny_model_dir, "--ppl", text_file, "--batch-size", "0"), "batch size")


def test_eval_through_an_int4_kv_cache_says_so_and_costs_a_little_perplexity(tiny_model_dir, text_file):
    plain, int4 = (run("eval", tiny_model_dir, "--ppl", text_file, "--seqlen", "128", *extra, "--json")
                   for extra in ((), ("--kv-cache", "int4")))
    assert plain.returncode == 0 and int4.returncode == 0, plain.stderr + int4.stderr
    a, b = json.loads(plain.stdout)[0], json.loads(int4.stdout)[0]
    assert (a["kv_cache"], b["kv_cache"]) == (None, "int4")
    assert a["perplexity"] != b["perplexity"] and abs(b["perplexity"] / a["perplexity"] - 1) < 0.05


def test_eval_refuses_an_unknown_kv_cache_before_loading(tiny_model_dir, text_file):
    assert_clean_failure(run("eval", tiny_model_dir, "--ppl", text_file, "--kv-cache", "int2"), "'int2'")


def test_eval_of_several_models_keeps_the_results_that_finished(tiny_model_dir, tmp_path, text_file):
    done = run("eval", tiny_model_dir, tmp_path / "missing", "--ppl", text_file, "--seqlen", "32", "--json")
    assert done.returncode == 2
    assert "no model" in done.stderr
    (result,) = json.loads(done.stdout)
    assert result["model"] == str(tiny_model_dir) and result["perplexity"] is not None


def test_non_finite_weights_are_an_error_naming_the_tensor(tiny_model_dir, tmp_path, text_file):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    tensors = safetensors_torch.load_file(damaged / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    safetensors_torch.save_file(tensors, damaged / "model.safetensors", metadata={"format": "pt"})
    assert_clean_failure(run("eval", damaged, "--ppl", text_file, "--seqlen", "32"),
                         "model.layers.1.mlp.up_proj.weight has 1 NaN/Inf values")


def test_quantize_w8a8_with_smoothquant_auto_then_eval_runs_the_quantized_activations(tiny_model_dir, tmp_path):
    out = tmp_path / "w8a8"
    done = run("quantize", tiny_model_dir, "-o", out, "--scheme", "W8A8", "--smoothquant", "auto", "--method", "rtn",
               "--calib", "shakespeare", "--nsamples", "4", "--seqlen", "32", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "inputs int8 sym per-token dynamic" in result["scheme"]
    assert any(note.startswith("SmoothQuant alpha, input_layernorm:") for note in result["notes"])
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {g["input_activations"]["strategy"] for g in config["config_groups"].values()} == {"token"}


def test_quantize_fp8_dynamic_needs_no_data_and_bench_says_fp8_is_for_accuracy(tiny_model_dir, tmp_path):
    out = tmp_path / "fp8"
    done = run("quantize", tiny_model_dir, "-o", out, "--scheme", "FP8_DYNAMIC", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["method"] == "rtn" and "fp8 per-channel" in result["scheme"]
    assert json.loads((out / "lowbit_recipe.json").read_text())["calibration"] is None
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "float-quantized"
    bench = run("bench", out, "--prompt-tokens", "16", "--decode-tokens", "4", "--repeats", "1", "--json")
    assert bench.returncode == 0, bench.stderr
    assert any("for accuracy, not speed" in line for line in json.loads(bench.stdout)["notices"])


@pytest.mark.parametrize("args, message", [
    (("--scheme", "FP8", "--group-size", "64"), "drop --group-size"),
    (("--scheme", "W8A8", "--smoothquant", "strong"), "between 0 and 1"),
    (("--scheme", "W8A8", "--bits", "4"), "drop --bits"),
    (("--scheme", "W5A5"), "unknown scheme"),
    (("--bits", "4", "--smoothquant", "0.5"), "choose an activation scheme"),
    (("--kv-cache", "int8"), "pass --kv-cache int8 to chat, serve, bench or eval instead"),
    (("--kv-cache", "q8_0"), "unknown KV cache format 'q8_0'"),
])
def test_activation_options_misused_fail_in_one_line(tiny_model_dir, tmp_path, args, message):
    assert_clean_failure(run("quantize", tiny_model_dir, "-o", tmp_path / "q", *args), message)
    assert not (tmp_path / "q").exists()


def test_export_to_gguf_refuses_what_it_cannot_write_in_one_line_and_writes_nothing(tiny_model_dir, tmp_path):
    """A grid no GGUF type holds is named with the types that would, and nothing is written; a grid one holds is
    written with the Hugging Face tokenizer converted, which reads back as the same tokenizer; an existing file is
    kept."""
    from transformers import AutoTokenizer

    from tests.conftest import TEXT

    per_channel, g32 = tmp_path / "w4-per-channel", tmp_path / "w4-g32"
    for out, group in ((per_channel, "0"), (g32, "32")):
        done = run("quantize", tiny_model_dir, "-o", out, "--method", "rtn", "--bits", "4", "--group-size", group)
        assert done.returncode == 0, done.stderr
    target = tmp_path / "tiny.gguf"
    assert_clean_failure(run("export", per_channel, "-o", target), "Q4_0 is int4 symmetric in groups of 32")
    assert not target.exists()
    done = run("export", g32, "-o", target)
    assert done.returncode == 0, done.stderr
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=target.name)
    original = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert back(TEXT[:400]).input_ids == original(TEXT[:400]).input_ids
    target.write_text("mine")
    assert_clean_failure(run("export", g32, "-o", target), "already exists; pass --overwrite")
    assert target.read_text() == "mine" and not (tmp_path / "q.gguf").exists()
