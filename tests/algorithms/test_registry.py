"""The method registry is the single truth: help, README and errors come from it; a new method is one record."""

import re
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.algorithms import METHODS, Method, data_free_methods, get_method, methods_help
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.schemes.args import MODES
from lowbit.errors import LowbitError
from lowbit.formats.compressed_tensors import read_record
from lowbit.quantized.modules import QuantLinear

README = (Path(__file__).parents[2] / "README.md").read_text()


def _readme_choices(command: str, option: str) -> list[str]:
    usage = README[README.index(f"lowbit {command} MODEL"):]
    return re.search(rf"\[{option} ([^\]\s]+)\]", usage).group(1).split("|")


def test_the_readme_lists_every_registered_method_and_mode():
    assert _readme_choices("quantize", "--method") == list(METHODS)
    assert _readme_choices("compress", "--method") == data_free_methods()
    assert _readme_choices("compress", "--mode") == list(MODES)


def test_help_and_errors_name_every_method():
    assert all(f"{name}: {m.summary}" in methods_help() for name, m in METHODS.items())
    assert [part.split(":")[0] for part in methods_help(data_free=True).split("; ")] == data_free_methods()
    with pytest.raises(LowbitError) as info:
        get_method("magic")
    assert all(name in str(info.value) for name in METHODS)


def test_a_new_method_is_one_record(tiny_model_dir, tmp_path, monkeypatch):
    """A toy method (RTN that counts its calls) registered in-process quantizes a tiny model end to end."""
    calls = []

    def counted_rtn(W, H, args):
        calls.append(tuple(W.shape))
        return rtn_quantize(W, H, args)

    toy = Method(name="toy", quantize=counted_rtn, summary="RTN, counted")
    monkeypatch.setitem(METHODS, "toy", toy)
    result, model, _ = lowbit.quantize(str(tiny_model_dir), lowbit.W4A16(group_size=32), method="toy", calib=None,
                                       output_dir=tmp_path / "q", progress=False, return_model=True)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert result.method == "toy" and len(calls) == len(linears) == 2 * 7  # 2 blocks of q/k/v/o/gate/up/down
    assert read_record(tmp_path / "q")["method"] == "toy"
    assert "toy: RTN, counted" in methods_help(data_free=True)
    reloaded = lowbit.evaluate(str(tmp_path / "q"), ppl=None, progress=False)
    assert reloaded.quantized and reloaded.bits_per_weight == pytest.approx(result.bits_per_weight)


def test_a_method_refuses_a_grid_it_cannot_use_before_the_model_loads(tiny_model_dir, tmp_path):
    with pytest.raises(LowbitError, match="symmetric 2-bit"):
        lowbit.quantize(str(tiny_model_dir), lowbit.W4A16(), method="ternary", output_dir=tmp_path / "q")
    with pytest.raises(LowbitError, match="symmetric 2-bit"):
        lowbit.compress(str(tiny_model_dir), tmp_path / "c", mode="int4_sym", method="ternary")
    assert not any(tmp_path.iterdir())


def test_compress_takes_ternary_with_int8_layers_kept_by_rtn(tiny_model_dir, tmp_path):
    result = lowbit.compress(str(tiny_model_dir), tmp_path / "t", mode="int2_sym", group_size=32, ratio=0.5,
                             method="ternary", progress=False)
    schemes = {row["scheme"].split(",")[0] for row in result.distribution}
    assert schemes == {"int2 sym g32", "int8 sym per-channel"}
    assert torch.isfinite(torch.tensor(result.bits_per_weight))
