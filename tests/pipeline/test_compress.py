import pytest
import torch

from lowbit.pipeline.quantize import compress_weights
from lowbit.errors import LowbitError
from lowbit.formats.compressed_tensors import load_quantized, save_quantized
from lowbit.quantized.modules import QuantLinear

from ..conftest import make_model


@pytest.fixture()
def model(tiny_tokenizer):
    return make_model(len(tiny_tokenizer), hidden=128, intermediate=256, layers=2)


def _bits_share(model):
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and ".layers." in n}
    total = sum(m.weight_q.numel() for m in layers.values())
    four = sum(m.weight_q.numel() for m in layers.values() if m.args.num_bits == 4)
    return four / total, layers


@pytest.mark.parametrize("ratio", [1.0, 0.6, 0.0])
def test_ratio_of_parameters_goes_to_the_primary_mode(model, ratio):
    report = compress_weights(model, "int4_sym", group_size=64, ratio=ratio)
    share, layers = _bits_share(model)
    assert len(layers) == 2 * 7
    assert abs(share - ratio) < 0.15
    dist = {row["scheme"].split()[0]: row for row in report.distribution()}
    assert abs(sum(row["parameters_pct"] for row in dist.values()) - 100) < 1e-6
    assert "int8" in dist  # the embedding table (and the head tied to it)
    if ratio > 0:
        assert abs(dist["int4"]["ratio_defining_pct"] - 100 * share) < 1e-6


def test_the_layers_kept_in_int8_are_the_most_sensitive(model):
    report = compress_weights(model, "int4_sym", group_size=64, ratio=0.5)
    four = [layer.sensitivity for layer in report.layers if layer.bits == 4 and layer.ranked]
    eight = [layer.sensitivity for layer in report.layers if layer.bits == 8 and layer.ranked]
    assert four and eight and max(four) <= min(eight)


@pytest.mark.parametrize("metric", [None, "hessian_input_activation"])
def test_data_aware_sensitivity_uses_the_data(model, tiny_tokenizer, metric):
    windows = torch.randint(0, len(tiny_tokenizer), (4, 32))
    other = torch.randint(0, len(tiny_tokenizer), (4, 32), generator=torch.Generator().manual_seed(1))
    report = compress_weights(model, "int4_asym", group_size=64, ratio=0.7, dataset=windows, sensitivity_metric=metric)
    assert report.recipe.sensitivity_metric == (metric or "fisher")
    assert all(p.requires_grad for p in model.parameters() if p.is_floating_point())
    fresh = make_model(len(tiny_tokenizer), hidden=128, intermediate=256, layers=2)
    again = compress_weights(fresh, "int4_asym", group_size=64, ratio=0.7, dataset=other, sensitivity_metric=metric)
    first = [layer.sensitivity for layer in report.layers if layer.ranked]
    second = [layer.sensitivity for layer in again.layers if layer.ranked]
    assert first and all(s is not None and s >= 0 for s in first + second)
    assert first != pytest.approx(second, rel=1e-3)  # other text, other sensitivities: the data is read


def test_fisher_without_data_ranks_on_text_the_model_samples_itself(model):
    report = compress_weights(model, "int4_sym", group_size=64, ratio=0.5, sensitivity_metric="fisher")
    assert report.recipe.sensitivity_metric == "fisher"
    four = [layer.sensitivity for layer in report.layers if layer.bits == 4 and layer.ranked]
    eight = [layer.sensitivity for layer in report.layers if layer.bits == 8 and layer.ranked]
    assert four and eight and max(four) <= min(eight) and max(eight) > 0


def test_data_aware_metric_without_data_is_refused(model):
    with pytest.raises(LowbitError, match="needs a dataset"):
        compress_weights(model, ratio=0.5, sensitivity_metric="hessian_input_activation")


@pytest.mark.parametrize("mode, method", [("nf4", "rtn"), ("fp4", "rtn"), ("int4_asym", "hqq")])
def test_compressed_checkpoints_load_back_with_the_same_logits(model, tiny_tokenizer, tmp_path, mode, method):
    compress_weights(model, mode, group_size=64, ratio=0.8, method=method)
    ids = torch.randint(0, len(tiny_tokenizer), (1, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    save_quantized(model, tiny_tokenizer, tmp_path, {})
    loaded, _ = load_quantized(tmp_path)
    with torch.no_grad():
        after = loaded(input_ids=ids).logits
    torch.testing.assert_close(after, before)
    groups = loaded.config.quantization_config["config_groups"]
    assert len(groups) >= 2  # one config group per scheme


def test_unknown_mode_is_refused(model):
    with pytest.raises(LowbitError, match="mode 'int5'"):
        compress_weights(model, "int5")


@pytest.mark.parametrize("all_layers", [False, True])
def test_embeddings_and_the_tied_head_share_one_quantized_table(model, tiny_tokenizer, tmp_path, all_layers):
    from lowbit.quantized.modules import QuantEmbedding

    compress_weights(model, "int4_sym", group_size=32, ratio=1.0, all_layers=all_layers)
    embed, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embed, QuantEmbedding) and isinstance(head, QuantLinear)
    assert head.weight_q is embed.weight_q  # one table, read both ways
    assert embed.args.num_bits == (4 if all_layers else 8)
    ids = torch.randint(0, len(tiny_tokenizer), (1, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    save_quantized(model, tiny_tokenizer, tmp_path, {})
    loaded, _ = load_quantized(tmp_path)
    assert loaded.lm_head.weight_q is loaded.model.embed_tokens.weight_q
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, before)


def test_ignored_embeddings_stay_full_precision(model):
    compress_weights(model, "int4_sym", group_size=32, ignore=("model.embed_tokens",))
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_transformers_runs_a_mixed_checkpoint_with_an_int8_tied_table(model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    compress_weights(model, "int4_sym", group_size=32, ratio=0.6)
    ids = torch.randint(0, len(tiny_tokenizer), (1, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    save_quantized(model, tiny_tokenizer, tmp_path, {})
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
