"""The study's verdicts from its rows: Pareto fronts, per-budget conclusions, unusable rows, the report files."""

from pathlib import Path

import pytest

from lowbit.study.report import conclusions, markdown, pareto, timing, unusable, write_report


def _row(model, bits, peak_mb, bpb, lambada, nextsent, se=0.02):
    tasks = {"lambada": {"metrics": {"acc": lambada}, "stderr": {"acc": se}, "items": 400},
             "nextsent": {"metrics": {"acc_norm": nextsent}, "stderr": {"acc_norm": se}, "items": 200}}
    label = f"{model} {'full precision' if bits == 16 else f'W{bits}'}"
    bench = {"model_peak_bytes": peak_mb * 1e6, "peak_rss_bytes": (peak_mb + 420) * 1e6, "size_bytes": peak_mb * 5e5,
             "decode_tok_s_median": 50.0, "memory_parts": {"runtime": 420e6},
             "cpu": {"cpu": "AMD EPYC", "kernel_isa": "avx2"}}
    return {"model": model, "bits": bits, "label": label, "method": "gptq", "group_size": 64, "commands": ["lowbit x"],
            "eval": {"bits_per_byte": bpb, "word_perplexity": 100.0, "tasks": tasks}, "bench": bench}


ROWS = [
    _row("small", 16, 300, 1.28, 0.46, 0.48), _row("small", 4, 120, 1.36, 0.40, 0.45),
    _row("small", 2, 90, 3.10, 0.00, 0.26),
    _row("big", 16, 600, 1.10, 0.60, 0.60), _row("big", 4, 200, 1.18, 0.55, 0.57),
]


def test_the_pareto_front_keeps_only_rows_nothing_beats_on_memory_and_bits_per_byte():
    front = pareto(ROWS, lambda r: -r["eval"]["bits_per_byte"])
    assert [r["label"] for r in front] == ["small W2", "small W4", "big W4", "big full precision"]


def test_conclusions_name_the_winner_per_budget_and_where_the_answer_flips():
    said = conclusions(ROWS)
    assert said[1].startswith("From 120 MB below 200 MB: small W4 is best")
    assert said[2].startswith("From 200 MB below 600 MB: big W4 is best") and "flips here from small W4 to big" in said[2]
    assert any(line.startswith("small W2 is unusable: bits per byte 3.100") for line in said)


def test_a_row_at_chance_on_every_task_is_unusable_even_with_a_plausible_bits_per_byte():
    rows = [_row("m", 16, 300, 1.3, 0.5, 0.5), _row("m", 3, 100, 1.5, 0.01, 0.27)]
    assert unusable(rows[1], rows) == "every task accuracy is within two standard errors of chance"
    assert unusable(rows[0], rows) is None


def test_the_report_is_self_contained_with_plots_table_and_commands(tmp_path: Path):
    pytest.importorskip("matplotlib")
    written = write_report(ROWS + [{"model": "x", "bits": 3, "label": "x W3", "error": "quantize failed"}], {"ppl": "austen"},
                           tmp_path)
    page = written["html"].read_text()
    assert page.count("data:image/png;base64,") == 2 and "lowbit x" in page and "x W3 did not finish" in page
    assert all(p.stat().st_size > 10_000 for p in written["plots"])
    table = markdown(ROWS)
    assert "0.550 ± 0.020" in table and table.count("\n") == len(ROWS) + 2


def test_the_time_to_measure_excludes_quantization_and_failed_rows():
    rows = [dict(_row("m", 16, 300, 1.3, 0.5, 0.5), eval_wall_s=100.0, bench_wall_s=20.0, quantize_wall_s=0.0),
            dict(_row("m", 4, 100, 1.4, 0.4, 0.4), eval_wall_s=80.0, bench_wall_s=40.0, quantize_wall_s=600.0),
            {"model": "m", "bits": 2, "label": "m W2", "error": "failed", "eval_wall_s": 1000.0}]
    assert timing(rows).startswith("Measuring the 2 rows took 4.0 min (evaluation and running; quantization, cached,"
                                   " another 10.0 min)")


def test_a_row_whose_checkpoint_was_reused_counts_the_quantization_its_record_states():
    reused = dict(_row("m", 4, 100, 1.4, 0.4, 0.4), eval_wall_s=60.0, bench_wall_s=0.0, quantize_wall_s=0.0,
                  quantize={"cached": True, "quantization_wall_time_s": 300.0})
    assert "1.0 min (evaluation and running; quantization, cached, another 5.0 min)" in timing([reused])
