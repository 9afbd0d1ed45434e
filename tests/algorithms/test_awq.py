import pytest
import torch
import torch.nn as nn

from lowbit.algorithms import get_method
from lowbit.algorithms.awq import (
    awq_transform_block,
    fake_quantize,
    gptq_rounding,
    rtn_rounding,
    search_clip,
    search_scales,
)
from lowbit.calibration.statistics import HessianAccumulator
from lowbit.pipeline.quantize import quantize_model
from lowbit.pipeline.recipe import Recipe
from lowbit.models.architectures import architecture_of
from lowbit.schemes import make_scheme

from ..conftest import make_outlier_model


def _salient_model(vocab):
    """A tiny Llama whose inputs have a few large channels, the situation AWQ is for."""
    return make_outlier_model(vocab, channels=4, value=20.0)


def _block_inputs(model, ids):
    captured = []
    handle = model.model.layers[0].register_forward_pre_hook(
        lambda m, a, k: captured.append((a[0] if a else k["hidden_states"], k)), with_kwargs=True
    )
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    x, kwargs = captured[0]
    kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
    return [x], kwargs


def test_smoothing_keeps_the_full_precision_function(tiny_tokenizer):
    """Scales moved from the norms into the linears change nothing before rounding (awq+gptq's transform)."""
    model = _salient_model(len(tiny_tokenizer))
    ids = torch.randint(0, len(tiny_tokenizer), (2, 32))
    block = model.model.layers[0]
    inputs, kwargs = _block_inputs(model, ids)
    with torch.no_grad():
        before = block(inputs[0], **kwargs)
    norm_before = block.input_layernorm.weight.clone()
    arch = architecture_of(model)
    calls = [(inputs[0], kwargs)]
    awq_transform_block(block, calls, make_scheme(4, 32).weights, arch.smoothing, arch.norm_offset, clip=False)
    with torch.no_grad():
        after = block(inputs[0], **kwargs)
    assert not torch.equal(norm_before, block.input_layernorm.weight)  # scales were moved
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_clipping_never_increases_the_output_error():
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    W[:, 5] *= 8
    X = torch.randn(256, 128)
    args = make_scheme(3, 32).weights
    plain = ((X @ (fake_quantize(W, args) - W).t()) ** 2).mean()
    clipped = ((X @ (fake_quantize(search_clip(W, X, args), args) - W).t()) ** 2).mean()
    assert clipped <= plain


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_beats_rtn_on_salient_channels(tiny_tokenizer, method):
    torch.manual_seed(0)
    calib = torch.randint(0, len(tiny_tokenizer), (8, 64))
    test = torch.randint(0, len(tiny_tokenizer), (4, 64))
    errors = {}
    for name in ("rtn", method):
        model = _salient_model(len(tiny_tokenizer))
        with torch.no_grad():
            reference = model(input_ids=test).logits
        quantize_model(model, Recipe(make_scheme(3, 32, actorder=None), get_method(name)), calib)
        with torch.no_grad():
            errors[name] = float(((model(input_ids=test).logits - reference) ** 2).mean())
    assert errors[method] < errors["rtn"]


def test_smoothing_is_described_as_data_for_each_family():
    from lowbit.models.architectures import ARCHITECTURES

    for name, arch in ARCHITECTURES.items():
        for sm in arch.smoothing:
            assert sm.balance and sm.inspect and sm.previous
    assert ARCHITECTURES["gemma3_text"].norm_offset == 1.0
    assert ARCHITECTURES["gemma3_text"].smoothing[2].previous == "pre_feedforward_layernorm"


def test_awq_rounds_on_the_clipped_range_without_shrinking_it_again():
    from lowbit.algorithms.awq import awq_round

    torch.manual_seed(0)
    W = torch.randn(8, 64).clamp(-2, 2)
    W[:, 0] = 3.0  # each row's largest weight: the range AWQ's clipping left
    qw, _ = awq_round(W, None, make_scheme(4, 64).weights)
    W_hat = qw.dequantize(torch.float32)
    torch.testing.assert_close(W_hat.abs().amax(dim=1), torch.full((8,), 3.0), rtol=0.07, atol=0)


@pytest.mark.parametrize("rounding", [rtn_rounding, gptq_rounding])
def test_scale_search_never_does_worse_than_leaving_the_channels_alone(rounding):
    """The search judges each candidate by the rounding that follows (RTN for awq, GPTQ for
    awq+gptq) and may keep s = 1, so the chosen scales never lose to no scaling on its objective."""
    torch.manual_seed(0)
    layer = nn.Linear(128, 64, bias=False)
    X = torch.randn(4, 32, 128)
    X[..., :4] *= 30
    args = make_scheme(3, 32, actorder=None).weights
    W = layer.weight.data.clone()
    acc = HessianAccumulator(128)
    acc.add(X)
    with torch.no_grad():
        reference = layer(X)

    def output_error(s):
        W_hat = rounding(W * s, acc.H / (s[:, None] * s[None, :]), args) / s
        return float(((X @ W_hat.t() - reference) ** 2).mean())

    s = search_scales(layer, [((X,), {})], [layer], args, rounding)
    assert torch.equal(layer.weight.data, W)  # the search leaves the weights as it found them
    assert output_error(s) <= output_error(torch.ones(128))
