"""A family lowbit has no record for is one record away: GPT-NeoX (other module paths, fused q/k/v,
LayerNorms with a bias, parallel attention and MLP, an untied head) registered
in-process is quantized end to end, saved, loaded back and run."""

import pytest
import torch

import lowbit
from lowbit.algorithms.awq import awq_transform_block
from lowbit.calibration.statistics import capture_block_inputs, run_block
from lowbit.errors import LowbitError
from lowbit.models.architectures import ARCHITECTURES, Architecture, Smoothing
from lowbit.models.loader import load_model
from lowbit.quantized.modules import QuantEmbedding, QuantLinear
from lowbit.schemes import make_scheme

NEOX = Architecture(
    blocks="gpt_neox.layers", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
    rotary="gpt_neox.rotary_emb",
    smoothing=(Smoothing("input_layernorm", ("attention.query_key_value",), "attention"),
               Smoothing("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp")),
)


def _neox(vocab: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        model.gpt_neox.embed_in.weight[:, :4] *= 8  # outlier channels, so that AWQ has something to move
        for layer in model.gpt_neox.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.normal_(1.0, 0.2)
                norm.bias.normal_(0.0, 0.5)  # a bias that smoothing must scale with the weight
    return model


@pytest.fixture()
def neox_dir(tmp_path, tiny_tokenizer):
    folder = tmp_path / "neox"
    _neox(len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def registered(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "gpt_neox", NEOX)


def test_an_unlisted_family_is_refused_before_any_work_naming_the_supported_ones(neox_dir, tmp_path, text_file,
                                                                                 monkeypatch):
    from lowbit import api

    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(LowbitError, match=r"'gpt_neox' is not supported; supported: .*llama"):
        lowbit.quantize(str(neox_dir), make_scheme(4, 32), method="gptq", calib=str(text_file),
                        output_dir=tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_the_record_resolves_in_the_real_module_tree(tiny_tokenizer):
    model = _neox(len(tiny_tokenizer))
    for path in (NEOX.blocks, NEOX.embed, NEOX.final_norm, NEOX.rotary, NEOX.lm_head):
        model.get_submodule(path)
    block = model.get_submodule(NEOX.blocks)[0]
    for s in NEOX.smoothing:
        width = block.get_submodule(s.previous).weight.shape[0]
        assert all(block.get_submodule(b).in_features == width for b in s.balance)
        block.get_submodule(s.inspect)


def test_smoothing_through_a_biased_layernorm_keeps_the_full_precision_function(registered, tiny_tokenizer):
    model = _neox(len(tiny_tokenizer))
    block = model.gpt_neox.layers[0]
    batches = list(torch.randint(0, len(tiny_tokenizer), (4, 24)).split(2))
    inputs, kwargs = capture_block_inputs(model, model.gpt_neox.layers, batches)
    calls = list(zip(inputs, kwargs[0]))
    with torch.no_grad():
        before = run_block(block, calls)
        norm_weight = block.input_layernorm.weight.detach().clone()
        awq_transform_block(block, calls, make_scheme(3, 32).weights, NEOX.smoothing, clip=False)
        after = run_block(block, calls)
    assert not torch.equal(block.input_layernorm.weight, norm_weight)  # scales were applied
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_awq_and_gptq_quantize_save_load_and_run_the_new_family(registered, neox_dir, tmp_path, text_file,
                                                                tiny_tokenizer):
    ids = torch.randint(0, len(tiny_tokenizer), (1, 16))
    for method in ("awq", "gptq"):
        out = tmp_path / method
        result, model, _ = lowbit.quantize(str(neox_dir), make_scheme(4, 32), method=method, calib=str(text_file),
                                           nsamples=4, seqlen=32, output_dir=out, progress=False, return_model=True)
        quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        assert result.layers == len(quantized) == 2 * 4  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h
        assert all(n.startswith("gpt_neox.layers.") for n in quantized)
        with torch.no_grad():
            expected = model(input_ids=ids).logits
        loaded, _, source = load_model(str(out), torch.float32)
        assert source.quantized
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    llm = lowbit.LLM(str(out))
    reply = llm.generate("It is a truth", lowbit.SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(reply.token_ids) == 4 and any("no lean decoder" in line for line in llm.notices)


def test_compress_finds_the_new_family_s_embedding_and_untied_head(registered, neox_dir, tmp_path):
    result, model, _ = lowbit.compress(str(neox_dir), tmp_path / "c", group_size=32, ratio=0.5, progress=False,
                                       return_model=True)
    assert isinstance(model.gpt_neox.embed_in, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.args.num_bits == 8 and model.gpt_neox.embed_in.args.num_bits == 8
    rows = {row["scheme"].split()[0]: row for row in result.distribution}
    assert abs(rows["int4"]["ratio_defining_pct"] - 50) < 15
