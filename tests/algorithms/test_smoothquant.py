"""SmoothQuant: the smoothing leaves full precision unchanged and makes W8A8 error smaller where inputs have outliers."""

import pytest
import torch

from lowbit.algorithms.smoothquant import (
    ALPHAS,
    output_error,
    smoothing_scales,
    smoothquant_transform_block,
    weight_max,
)
from lowbit.calibration.statistics import capture_block_inputs, capture_inputs
from lowbit.models.architectures import architecture_of

from ..conftest import make_outlier_model


def _outlier_model(vocab):
    """A tiny Llama whose norms give a few input channels 30x the others, as LLM activations have."""
    return make_outlier_model(vocab)


def _calls(model, vocab):
    torch.manual_seed(1)
    batches = list(torch.randint(0, vocab, (4, 32)).split(2))
    inputs, kwargs = capture_block_inputs(model, model.model.layers, batches)
    return list(zip(inputs, kwargs[0]))


def test_smoothing_scales_follow_the_formula():
    x_max, w_max = torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0])
    s = smoothing_scales(x_max, w_max, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))
    assert float(s[2]) == pytest.approx((1e-5) ** 0.5 / 2 ** 0.5)  # a silent channel: floored, not 0 or NaN
    assert torch.allclose(smoothing_scales(x_max, w_max, 1.0)[:2], x_max[:2])


@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_smoothing_keeps_the_full_precision_block_and_reports_an_alpha_per_smoothing(alpha):
    model = _outlier_model(300)
    block = model.model.layers[0]
    calls = _calls(model, 300)
    with torch.no_grad():
        before = [block(x, **kw) for x, kw in calls]
        chosen = smoothquant_transform_block(block, calls, architecture_of(model).smoothing, alpha)
        after = [block(x, **kw) for x, kw in calls]
    before, after = ([y[0] if isinstance(y, tuple) else y for y in ys] for ys in (before, after))
    assert set(chosen) == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}  # v → o: GQA widths differ
    assert all(a is None or a in ALPHAS for a in chosen.values())
    if alpha == 0.5:
        assert set(chosen.values()) == {0.5}
    for b, a in zip(before, after):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_auto_alpha_lowers_the_w8a8_error_where_the_inputs_have_outliers():
    model = _outlier_model(300)
    block = model.model.layers[0]
    calls = _calls(model, 300)
    attention, qkv = block.self_attn, [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj]
    with torch.no_grad():
        seen = capture_inputs(block, calls, {"self_attn": attention})["self_attn"]
        reference = [attention(*a, **k)[0] for a, k in seen]
        unsmoothed = output_error(attention, seen, reference, qkv, torch.ones(128))
        chosen = smoothquant_transform_block(block, calls, architecture_of(model).smoothing, "auto")
        seen = capture_inputs(block, calls, {"self_attn": attention})["self_attn"]  # the norm now divides by s
        for got, want in zip([attention(*a, **k)[0] for a, k in seen], reference):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        smoothed = output_error(attention, seen, reference, qkv, torch.ones(128))
    assert chosen["input_layernorm"] is not None
    assert smoothed < 0.5 * unsmoothed
