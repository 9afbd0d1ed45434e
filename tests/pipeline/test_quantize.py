import pytest
import torch

from lowbit import api
from lowbit.algorithms import get_method
from lowbit.pipeline.quantize import quantize_model
from lowbit.pipeline.recipe import Recipe
from lowbit.errors import LowbitError
from lowbit.quantized.modules import QuantLinear
from lowbit.schemes import make_scheme

from ..conftest import make_model


def test_every_decoder_linear_is_replaced_and_lm_head_is_kept(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer))
    calibration = torch.randint(0, len(tiny_tokenizer), (8, 16))
    report = quantize_model(model, Recipe(make_scheme(4, 32), get_method("gptq")), calibration, batch_size=4)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == len(report.layers) == 2 * 7
    assert all(".layers." in n for n in quantized)
    assert isinstance(model.lm_head, torch.nn.Linear)


def test_gptq_quantizes_lm_head_on_final_norm_activations_when_asked(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer))
    embedding = model.model.embed_tokens.weight.detach().clone()
    calibration = torch.randint(0, len(tiny_tokenizer), (4, 16))
    report = quantize_model(model, Recipe(make_scheme(4, 32), get_method("gptq"), include_lm_head=True), calibration)
    assert isinstance(model.lm_head, QuantLinear) and report.layers[-1].name == "lm_head"
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, embedding)


def test_gptq_model_tracks_the_original_better_than_rtn(tiny_tokenizer):
    torch.manual_seed(0)
    ids = torch.randint(0, len(tiny_tokenizer), (16, 32))
    reference = make_model(len(tiny_tokenizer))
    with torch.no_grad():
        target = reference(input_ids=ids).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model = make_model(len(tiny_tokenizer))
        quantize_model(model, Recipe(make_scheme(3, 32), get_method(method)), ids, batch_size=8)
        with torch.no_grad():
            errors[method] = float((model(input_ids=ids).logits - target).pow(2).mean())
    assert errors["gptq"] < errors["rtn"]


def test_gptaq_rounds_later_blocks_for_the_full_precision_model_s_outputs(tiny_tokenizer):
    """The first block sees the same inputs in both streams, so GPTAQ rounds it exactly as GPTQ; the second block's
    rounding aims at the full-precision outputs, and the model's logits land nearer the original's."""
    torch.manual_seed(0)
    ids = torch.randint(0, len(tiny_tokenizer), (16, 32))
    reference = make_model(len(tiny_tokenizer))
    with torch.no_grad():
        target = reference(input_ids=ids).logits
    errors, models = {}, {}
    for method in ("gptq", "gptaq"):
        models[method] = model = make_model(len(tiny_tokenizer))
        quantize_model(model, Recipe(make_scheme(3, 32), get_method(method)), ids, batch_size=8)
        with torch.no_grad():
            errors[method] = float((model(input_ids=ids).logits - target).pow(2).mean())
    first, second = ([layer.mlp.down_proj.weight_q for layer in models[m].model.layers] for m in ("gptq", "gptaq"))
    assert torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])
    assert errors["gptaq"] < errors["gptq"]


def test_ignore_keeps_matching_layers_in_full_precision(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer))
    quantize_model(model, Recipe(make_scheme(4, 32), get_method("rtn"), ignore=("re:.*down_proj",)))
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)


def test_nan_weights_are_refused_naming_the_layer(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.layers.1.self_attn.v_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LowbitError, match="model.layers.1.self_attn.v_proj.weight has 1 NaN"):
        api.quantize(str(broken), make_scheme(4, 32), method="rtn", output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()