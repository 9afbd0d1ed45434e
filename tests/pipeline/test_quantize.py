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
    from lowbit.calibration.statistics import capture_block_inputs, run_block
    from lowbit.models.architectures import decoder_blocks

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
