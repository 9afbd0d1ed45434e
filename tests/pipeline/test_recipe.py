"""A recipe is checked before any work; quantize and compress are two ways of writing one."""

from dataclasses import replace

import pytest
import torch

import lowbit
from lowbit.algorithms import get_method
from lowbit.errors import LowbitError
from lowbit.pipeline.recipe import Recipe, compress_recipe
from lowbit.quantized.modules import QuantLinear
from lowbit.schemes import QuantizationArgs, make_scheme, mode_scheme


def test_activations_lowbit_cannot_quantize_and_the_kv_cache_are_refused_before_any_work(tiny_model_dir, tmp_path):
    int8 = QuantizationArgs(num_bits=8, strategy="channel", group_size=None)
    with_acts = replace(make_scheme(8, None), input_activations=int8)
    assert with_acts.describe().startswith("W8A8")
    with pytest.raises(LowbitError, match="activation strategy is 'token' or 'tensor'"):
        lowbit.quantize(str(tiny_model_dir), with_acts, method="rtn", output_dir=tmp_path / "q")
    with pytest.raises(LowbitError, match="kv_cache_scheme"):
        Recipe(make_scheme(), get_method("rtn"), kv_cache_scheme=int8).checked(has_data=False)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("recipe, message", [
    (Recipe(make_scheme(), get_method("gptq")), "needs calibration text"),
    (Recipe(make_scheme(), get_method("rtn"), ratio=1.5), "ratio must be between 0 and 1"),
    (Recipe(make_scheme(), get_method("rtn"), ratio=0.5, sensitivity_metric="vibes"), "sensitivity metric 'vibes'"),
    (Recipe(make_scheme(), get_method("rtn"), ratio=0.5, sensitivity_metric="hessian_input_activation"),
     "needs a dataset"),
    (Recipe(make_scheme(4), get_method("ternary")), "symmetric 2-bit"),
])
def test_bad_recipes_are_refused_with_what_is_wrong(recipe, message):
    with pytest.raises(LowbitError, match=message):
        recipe.checked(has_data=False)


def test_mixed_precision_with_a_calibrated_method_is_refused_rather_than_ranked_wrongly():
    with pytest.raises(LowbitError, match="takes a data-free method"):
        Recipe(make_scheme(), get_method("gptq"), ratio=0.5).checked(has_data=True)


def test_checking_fills_in_the_defaults_the_method_implies():
    checked = Recipe(make_scheme(actorder="weight"), get_method("rtn"), ratio=0.5).checked(has_data=True)
    assert checked.scheme.weights.actorder is None and checked.sensitivity_metric == "fisher"
    assert Recipe(make_scheme(), get_method("gptq")).checked(has_data=True).scheme.weights.actorder == "weight"


def test_compress_modes_are_scheme_presets():
    assert mode_scheme("nf4", 64).weights.type == "nf"
    assert mode_scheme("int4_asym", 64).weights.symmetric is False
    eight = mode_scheme("int8_sym", 64).weights
    assert eight.strategy == "channel" and eight.group_size is None  # per-channel, as NNCF
    with pytest.raises(LowbitError, match="compress takes a data-free method"):
        compress_recipe(method="gptq")


def test_quantize_and_compress_with_the_same_grid_give_the_same_layers(tiny_model_dir, tmp_path):
    """One body: RTN W4 g32 written as ``quantize`` and as ``compress --ratio 1`` rounds every layer alike."""
    _, quantized, _ = lowbit.quantize(str(tiny_model_dir), make_scheme(4, 32), method="rtn", progress=False,
                                      return_model=True)
    result, compressed, _ = lowbit.compress(str(tiny_model_dir), mode="int4_sym", group_size=32, progress=False,
                                            ignore=("model.embed_tokens", "lm_head"), return_model=True)
    ours = {n: m for n, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    theirs = {n: m for n, m in compressed.named_modules() if isinstance(m, QuantLinear)}
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 7
    for name, layer in ours.items():
        assert torch.equal(layer.weight_q, theirs[name].weight_q), name
        assert torch.equal(layer.weight_scale, theirs[name].weight_scale), name
    assert result.scheme == "int4_sym g32 ratio 1.0"
