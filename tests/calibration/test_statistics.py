"""The statistics calibration collects, each against its formula computed by hand."""

import pytest
import torch

from lowbit.calibration.statistics import (
    AbsMax,
    HessianAccumulator,
    activation_second_moments,
    capture_block_inputs,
    capture_inputs,
    collect_asymmetric,
    collect_hessians,
    empirical_fisher,
    input_ranges,
    observe_inputs,
    observe_kv,
    run_block,
)
from lowbit.models.architectures import decoder_blocks

from ..conftest import make_model


def _block_calls(tiny_tokenizer, model):
    batches = list(torch.randint(0, len(tiny_tokenizer), (4, 16), generator=torch.Generator().manual_seed(0)).split(2))
    _, blocks = decoder_blocks(model)
    inputs, kwargs = capture_block_inputs(model, blocks, batches)
    return blocks[0], list(zip(inputs, kwargs[0])), batches


def test_hessians_are_2_over_n_xxt_of_each_linear_s_input_shared_where_the_input_is(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer))
    block, calls, _ = _block_calls(tiny_tokenizer, model)
    linears = {f"b.{n}": m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    seen = capture_inputs(block, calls, {"q": block.self_attn.q_proj, "down": block.mlp.down_proj})
    H = collect_hessians(block, linears, calls)
    for name, short in (("b.self_attn.q_proj", "q"), ("b.mlp.down_proj", "down")):
        X = torch.cat([a[0].reshape(-1, a[0].shape[-1]) for a, _ in seen[short]])
        torch.testing.assert_close(H[name], 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-5)
    assert H["b.self_attn.q_proj"] is H["b.self_attn.v_proj"]  # q, k, v read one tensor: one H
    assert H["b.mlp.gate_proj"] is H["b.mlp.up_proj"] and H["b.mlp.up_proj"] is not H["b.mlp.down_proj"]


def test_asymmetric_statistics_pair_each_linear_s_inputs_from_both_streams(tiny_tokenizer):
    """H̃ = 2/n Σ x̃ x̃ᵀ on the quantized stream, G = 2/n Σ x x̃ᵀ pairing the same tokens' full-precision inputs,
    and the block's full-precision outputs, which the next block's statistics start from."""
    model = make_model(len(tiny_tokenizer))
    block, fp_calls, _ = _block_calls(tiny_tokenizer, model)
    calls = [(x + 0.1 * torch.randn_like(x), kw) for x, kw in fp_calls]
    names = {"q": block.self_attn.q_proj, "k": block.self_attn.k_proj, "down": block.mlp.down_proj}
    H, G, outputs = collect_asymmetric(block, names, calls, fp_calls)
    assert H["q"] is H["k"] and G["q"] is G["k"] and H["q"] is not H["down"]  # q and k read one tensor
    seen, fp_seen = capture_inputs(block, calls, names), capture_inputs(block, fp_calls, names)
    for name in names:
        X_tilde = torch.cat([a[0].reshape(-1, a[0].shape[-1]) for a, _ in seen[name]])
        X = torch.cat([a[0].reshape(-1, a[0].shape[-1]) for a, _ in fp_seen[name]])
        torch.testing.assert_close(H[name], 2 * X_tilde.T @ X_tilde / X.shape[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(G[name], 2 * X.T @ X_tilde / X.shape[0], rtol=1e-4, atol=1e-5)
        assert (G[name] - H[name]).norm() > 0.01 * H[name].norm()  # the streams do differ
    for mine, expected in zip(outputs, run_block(block, fp_calls)):
        torch.testing.assert_close(mine, expected)


def test_second_moments_are_half_the_hessian_diagonal(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer))
    block, calls, batches = _block_calls(tiny_tokenizer, model)
    name = "model.layers.0.mlp.down_proj"
    H = collect_hessians(block, {name: block.mlp.down_proj}, calls)[name]
    moments = activation_second_moments(model, [name], torch.cat(batches), batch_size=2)[name]
    torch.testing.assert_close(moments, torch.diagonal(H) / 2, rtol=1e-4, atol=1e-6)


def test_capture_samples_evenly_spaced_rows():
    linear = torch.nn.Linear(4, 3)
    x = torch.arange(40.0).reshape(10, 4)
    rows = capture_inputs(linear, [(x, {})], {"l": linear}, rows=4)["l"][0]
    torch.testing.assert_close(rows, x[[0, 3, 6, 9]])


def test_hooks_are_removed_even_when_the_forward_fails():
    linear = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError):
        with observe_inputs({"l": linear}, lambda name, a, k: None):
            linear(torch.zeros(2, 5))
    assert not linear._forward_pre_hooks


def test_hessian_accumulator_is_the_mean_outer_product():
    X = torch.randn(100, 8)
    acc = HessianAccumulator(8)
    acc.add(X[:30])
    acc.add(X[30:])
    torch.testing.assert_close(acc.H, 2 * X.T @ X / 100, rtol=1e-5, atol=1e-5)


def test_empirical_fisher_is_the_mean_squared_per_window_gradient(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer))
    windows = torch.randint(0, len(tiny_tokenizer), (3, 16))
    name = "model.layers.1.mlp.down_proj"
    fisher = empirical_fisher(model, [name], windows)[name]
    expected = torch.zeros_like(fisher)
    for w in windows:
        logits = model(input_ids=w[None]).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum")
        (g,) = torch.autograd.grad(loss, [model.get_submodule(name).weight])
        expected += g * g / len(windows)
    torch.testing.assert_close(fisher, expected)
    assert fisher.abs().sum() > 0


def _tiny_gemma3(vocab: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=4, layer_types=["sliding_attention", "full_attention",
        "sliding_attention"], max_position_embeddings=64,
    )
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_replaying_blocks_with_captured_arguments_reproduces_the_model(tiny_tokenizer, family):
    """Each block gets its own keyword arguments (Gemma 3: sliding-window and global masks and rotary tables)."""
    model = make_model(len(tiny_tokenizer)) if family == "llama" else _tiny_gemma3(len(tiny_tokenizer))
    batches = list(torch.randint(0, len(tiny_tokenizer), (4, 16)).split(2))
    _, blocks = decoder_blocks(model)
    inputs, block_kwargs = capture_block_inputs(model, blocks, batches)
    with torch.no_grad():
        for i, block in enumerate(blocks):
            inputs = run_block(block, list(zip(inputs, block_kwargs[i])))
        expected = [model.model(input_ids=b).last_hidden_state for b in batches]
        replayed = [model.model.norm(h) for h in inputs]
    for a, b in zip(replayed, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if family == "gemma3":
        masks = [kw[0]["attention_mask"] for kw in block_kwargs]
        same = masks[1] is not None and torch.equal(masks[0], masks[1])
        assert masks[0] is not None and not same  # the global block sees further back than the sliding ones



class _TwoInputs(torch.nn.Module):
    """a and b read the same input, c another (a block whose calls are (x, {"y": y}))."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(64, 16) for _ in range(3))

    def forward(self, x, y):
        return self.a(x) + self.b(x) + self.c(y)


def test_static_ranges_clip_an_outlier_token_where_that_lowers_the_output_error():
    from lowbit.schemes import W8A8_STATIC
    from lowbit.calibration.statistics import CLIP_RATIOS
    from lowbit.schemes.activations import fake_quantize_activation, static_scale

    torch.manual_seed(0)
    block, args = _TwoInputs(), W8A8_STATIC().input_activations
    x = torch.randn(4, 1024, 64)
    x[0, 0, :2] = 200.0  # one attention-sink-like token, large in two channels
    y = torch.rand(4, 1024, 64) * 2 - 1  # uniform: clipping only adds error
    linears = {"a": block.a, "b": block.b, "c": block.c}
    ranges = input_ranges(block, linears, [(x, {"y": y})], args, stride=1)
    assert ranges["a"] == ranges["b"]  # one input, one range: the fused q/k/v or gate/up can share a scale
    (range_x, r_x), (range_y, r_y) = ranges["a"], ranges["c"]
    assert r_y == 1.0 and torch.equal(range_y, y.abs().amax())
    assert r_x < 1.0 and torch.allclose(range_x, x.abs().amax() * r_x)

    def output_error(rng):
        X = x.reshape(-1, 64)
        err = fake_quantize_activation(X, args, static_scale(rng, args)) - X
        return float((err @ block.a.weight.T).pow(2).sum() + (err @ block.b.weight.T).pow(2).sum())

    amax = x.abs().amax()
    assert output_error(range_x) < 0.7 * output_error(amax)  # measured 0.57 with r = 0.6
    best = min(output_error(amax * r) for r in CLIP_RATIOS)  # the true error's best candidate, for comparison
    assert output_error(range_x) <= 1.1 * best
    from lowbit.schemes import FP8

    fp8 = input_ranges(block, linears, [(x, {"y": y})], FP8().input_activations, stride=1)
    assert fp8["a"] == (amax, 1.0)  # FP8's error is relative: its range is max|x|


def test_observed_keys_and_values_are_what_the_model_caches(tiny_tokenizer):
    """After RoPE, before the GQA repeat: max |K| and max |V| equal those of transformers' own cache."""
    model = make_model(len(tiny_tokenizer))
    block, calls, batches = _block_calls(tiny_tokenizer, model)
    implementation = model.config._attn_implementation
    amax = AbsMax()
    with observe_kv(block.self_attn, amax):
        outputs = run_block(block, calls)
    assert model.config._attn_implementation == implementation
    with torch.no_grad():
        cache = model(torch.cat(batches), use_cache=True).past_key_values.layers[0]
    assert float(amax.k) == pytest.approx(float(cache.keys.abs().max()), rel=1e-6)
    assert float(amax.v) == pytest.approx(float(cache.values.abs().max()), rel=1e-6)
    torch.testing.assert_close(torch.cat(outputs), torch.cat(run_block(block, calls)), rtol=1e-5, atol=1e-6)
