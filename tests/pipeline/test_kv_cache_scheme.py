"""A calibrated KV cache scheme: static fp8 scales from the quantized model's own keys and values."""

import pytest
import torch

from lowbit.algorithms import get_method
from lowbit.errors import LowbitError
from lowbit.pipeline.quantize import quantize_model
from lowbit.pipeline.recipe import Recipe
from lowbit.schemes.args import QuantizationArgs, make_scheme
from lowbit.schemes.kv_cache import FP8_STATIC, calibrated_scheme

from ..conftest import make_model


def test_scales_are_max_abs_of_the_quantized_model_s_cache_over_448(tiny_tokenizer):
    """Block i is calibrated after blocks 0 … i (weights included) are quantized: its scales are those of the
    cache the quantized model fills on the calibration windows."""
    model = make_model(len(tiny_tokenizer), layers=3)
    windows = torch.randint(0, len(tiny_tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    report = quantize_model(model, Recipe(make_scheme(4, 32), get_method("gptq"), kv_cache_scheme=FP8_STATIC),
                            windows, batch_size=2)
    with torch.no_grad():
        cache = model(windows, use_cache=True).past_key_values
    for i, layer in enumerate(model.model.layers):
        k, v = cache.layers[i].keys.abs().max() / 448, cache.layers[i].values.abs().max() / 448
        assert float(layer.self_attn.k_scale) == pytest.approx(float(k), rel=1e-5)
        assert float(layer.self_attn.v_scale) == pytest.approx(float(v), rel=1e-5)
        assert report.kv_cache_scales[f"model.layers.{i}.self_attn"] == (
            float(layer.self_attn.k_scale), float(layer.self_attn.v_scale))
    assert Recipe(make_scheme(4, 32), get_method("rtn"), kv_cache_scheme=FP8_STATIC).record()["kv_cache_scheme"][
        "type"] == "float"


def test_what_cannot_be_calibrated_is_refused_before_any_work():
    with pytest.raises(LowbitError, match="--calib"):
        Recipe(make_scheme(4, 32), get_method("rtn"), kv_cache_scheme=FP8_STATIC).checked(has_data=False)
    with pytest.raises(LowbitError, match="pass --kv-cache int8 to chat, serve, bench or eval"):
        calibrated_scheme("int8")
    with pytest.raises(LowbitError, match="unknown KV cache format"):
        calibrated_scheme("fp16")
    int8_static = QuantizationArgs(num_bits=8, type="int", strategy="tensor", group_size=None)
    with pytest.raises(LowbitError, match="not one lowbit runs"):
        Recipe(make_scheme(4, 32), get_method("rtn"), kv_cache_scheme=int8_static).checked(has_data=True)
