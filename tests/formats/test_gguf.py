"""GGUF writing on tiny models built here: llama.cpp's block types hold lowbit's codes unchanged, and the file
names, orders and describes its tensors as llama.cpp's own converter does (read back with gguf-py)."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, quants

from lowbit.errors import LowbitError
from lowbit.formats.gguf.blocks import TYPES, block_type_for, decode, encode, float16_change, scheme_for
from lowbit.formats.gguf.metadata import Field
from lowbit.formats.gguf.writer import unrepresentable, write_gguf
from lowbit.models.architectures import architecture_of
from lowbit.quantized.modules import QuantLinear, replace_module
from lowbit.schemes import make_scheme, quantize
from tests.conftest import make_model

TOKENIZER = [
    Field("tokenizer.ggml.model", "gpt2", GGUFValueType.STRING),
    Field("tokenizer.ggml.tokens", [f"t{i}" for i in range(128)], GGUFValueType.ARRAY, GGUFValueType.STRING),
    Field("tokenizer.ggml.token_type", [1] * 128, GGUFValueType.ARRAY, GGUFValueType.INT32),
    Field("tokenizer.ggml.merges", ["t 1"], GGUFValueType.ARRAY, GGUFValueType.STRING),
]


@pytest.mark.parametrize("name", list(TYPES))
def test_each_type_holds_lowbits_codes_and_llama_cpp_reads_back_lowbits_weights(name):
    kind = TYPES[name]
    qw = quantize(torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * 0.02, scheme_for(kind).weights)
    blocks = encode(qw, kind)
    block_size, block_bytes = GGML_QUANT_SIZES[kind.qtype]
    assert blocks.dtype == np.uint8 and blocks.shape == (48, 256 // block_size * block_bytes)
    got, exact = decode(blocks, kind), qw.dequantize(torch.float32)
    if kind.symmetric:  # float16 scales, as the scheme stores them: the same numbers
        assert torch.equal(got, exact)
    else:  # the offset m = −s·(8 + z) is rounded to float16: at most half a float16 step of |m|
        m = (qw.scale.float() * (8 + qw.zero_point.float())).abs().max()
        assert float((got - exact).abs().max()) <= 2**-11 * float(m) + 1e-7


def test_float32_scales_move_by_their_float16_rounding_only():
    qw = quantize(torch.randn(64, 256, generator=torch.Generator().manual_seed(1)), make_scheme(4, 32).weights)
    change = float16_change(qw, TYPES["Q4_0"])
    assert qw.scale.dtype == torch.float32 and 0 < change < 2**-11


def test_which_grids_a_type_holds():
    def kind(bits, group, symmetric=True):
        found = block_type_for(make_scheme(bits, group, symmetric).weights, 256)
        return None if found is None else found.name

    assert (kind(4, 32), kind(4, 32, False), kind(8, 32)) == ("Q4_0", "Q4_1", "Q8_0")
    assert kind(4, 64) is None and kind(4, 0) is None and kind(3, 32) is None and kind(8, 0) is None


def test_a_scheme_that_contradicts_the_type_is_refused():
    with pytest.raises(LowbitError, match="Q4_0 is int4 symmetric in groups of 32; the scheme asks for int4 sym g64"):
        scheme_for(TYPES["Q4_0"], make_scheme(4, 64))
    assert scheme_for(TYPES["Q4_1"], make_scheme(4, 32, False, observer="minmax")).weights.observer == "minmax"


def _quantized_tiny(kind_name: str):
    model = make_model(128, hidden=64, intermediate=96)
    args = scheme_for(TYPES[kind_name]).weights
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            replace_module(model, name, QuantLinear.from_quantized(quantize(module.weight.detach(), args)))
    return model


def _tensors(path):
    reader = GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def _value(reader, key):
    return reader.fields[key].contents()


def test_a_llama_is_written_as_llama_cpp_converts_it(tmp_path):
    model = _quantized_tiny("Q4_0")
    q0 = model.model.layers[0].self_attn.q_proj
    q0.bias = torch.nn.Parameter(torch.arange(64, dtype=torch.float32))  # a q bias moves with its rows
    path = tmp_path / "tiny.gguf"
    written = write_gguf(model, architecture_of(model), path, TOKENIZER, "tiny", record={"method": "rtn"})
    assert written.file_type == "Q4_0" and written.types == {"Q4_0": 14, "Q8_0": 1, "F32": 6}
    reader, tensors = _tensors(path)
    assert _value(reader, "general.architecture") == "llama" and _value(reader, "general.file_type") == 2
    assert [_value(reader, f"llama.{k}") for k in ("block_count", "embedding_length", "feed_forward_length",
                                                     "attention.head_count", "attention.head_count_kv",
                                                     "context_length", "rope.dimension_count")] == [2, 64, 96, 4, 2, 256, 16]
    assert _value(reader, "tokenizer.ggml.tokens") == TOKENIZER[1].value and "rtn" in _value(reader, "lowbit.recipe")
    assert "output.weight" not in tensors  # tied: llama.cpp reads the embedding table
    for i, layer in enumerate(model.model.layers):
        for gguf_name, module, heads in (("attn_q", layer.self_attn.q_proj, 4), ("attn_k", layer.self_attn.k_proj, 2),
                                          ("attn_v", layer.self_attn.v_proj, None), ("ffn_down", layer.mlp.down_proj, None)):
            t = tensors[f"blk.{i}.{gguf_name}.weight"]
            assert t.tensor_type.name == "Q4_0"
            rows = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).copy())
            want = module.quantized_weight().dequantize(torch.float32)
            if heads:  # llama.cpp's converter pairs each head's rotary halves: (h, 2, d/2) → (h, d/2, 2)
                want = want.reshape(heads, 2, -1, want.shape[1]).transpose(1, 2).reshape(want.shape)
            assert torch.equal(rows, want)
        if i == 0:
            bias = torch.from_numpy(np.array(tensors["blk.0.attn_q.bias"].data))
            assert torch.equal(bias, torch.arange(64.0).reshape(4, 2, -1).transpose(1, 2).reshape(-1))
        norm = torch.from_numpy(np.array(tensors[f"blk.{i}.attn_norm.weight"].data))
        assert torch.equal(norm, layer.input_layernorm.weight.detach())
    embedding = torch.from_numpy(quants.dequantize(tensors["token_embd.weight"].data, tensors["token_embd.weight"].tensor_type).copy())
    table = model.model.embed_tokens.weight.detach()
    assert float((embedding - table).abs().max()) < 0.01 * float(table.abs().max())


def test_gemma_norms_are_written_as_one_plus_w_and_its_attention_rows_stay_in_order(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16,
                              max_position_embeddings=256)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_()
    path = tmp_path / "gemma.gguf"
    write_gguf(model, architecture_of(model), path, TOKENIZER, "gemma", dense_type="F32")
    reader, tensors = _tensors(path)
    assert _value(reader, "general.architecture") == "gemma3"
    assert [_value(reader, f"gemma3.{k}") for k in ("attention.key_length", "attention.sliding_window",
                                                      "attention.head_count_kv")] == [32, 16, 1]
    layer = model.model.layers[0]
    for gguf_name, norm in (("attn_norm", layer.input_layernorm), ("attn_q_norm", layer.self_attn.q_norm),
                            ("post_ffw_norm", layer.post_feedforward_layernorm)):
        got = torch.from_numpy(np.array(tensors[f"blk.0.{gguf_name}.weight"].data))
        assert torch.equal(got, 1 + norm.weight.detach())
    q = torch.from_numpy(np.array(tensors["blk.0.attn_q.weight"].data)).reshape(64, 64)
    assert torch.equal(q, layer.self_attn.q_proj.weight.detach())


def test_a_grid_no_type_holds_is_refused_naming_the_types(tmp_path):
    model = make_model(128, hidden=64, intermediate=96)
    replace_module(model, "model.layers.0.mlp.up_proj", QuantLinear.from_quantized(
        quantize(model.model.layers[0].mlp.up_proj.weight.detach(), make_scheme(4, 64).weights)))
    assert unrepresentable(model) == ["model.layers.0.mlp.up_proj: int4 sym g64, act-order, mse"]
    with pytest.raises(LowbitError, match="no GGUF type holds exactly .*Q4_0 is int4 symmetric in groups of 32"):
        write_gguf(model, architecture_of(model), tmp_path / "x.gguf", TOKENIZER, "x")
    assert not (tmp_path / "x.gguf").exists()
