"""GGUF writing on tiny models built here: llama.cpp's block types hold lowbit's codes unchanged, and the file
names, orders and describes its tensors as llama.cpp's own converter does (read back with gguf-py)."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, quants

from lowbit.errors import LowbitError
from lowbit.formats.gguf.blocks import EXACT, decode, exact_args, encode, exact_type, float16_change, from_grid, qtype
from lowbit.formats.gguf.metadata import Field
from lowbit.formats.gguf.presets import Tensor, tensor_types
from lowbit.formats.gguf.writer import unrepresentable, write_gguf
from lowbit.models.architectures import architecture_of
from lowbit.quantized.modules import GGMLLinear, QuantLinear, replace_module
from lowbit.schemes import ggml, make_scheme, quantize
from tests.conftest import make_model

TOKENIZER = [
    Field("tokenizer.ggml.model", "gpt2", GGUFValueType.STRING),
    Field("tokenizer.ggml.tokens", [f"t{i}" for i in range(128)], GGUFValueType.ARRAY, GGUFValueType.STRING),
    Field("tokenizer.ggml.token_type", [1] * 128, GGUFValueType.ARRAY, GGUFValueType.INT32),
    Field("tokenizer.ggml.merges", ["t 1"], GGUFValueType.ARRAY, GGUFValueType.STRING),
]


def _weights(rows=48, cols=512, seed=0):
    """Rows of different scales, a zero block, an all-positive row and an outlier: what the block fits must meet."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.005, 0.05, rows)[:, None]
    w[0, :256] = 0
    w[1] = w[1].abs()
    w[2, 7] = 1.0
    return w


@pytest.mark.parametrize("name", list(ggml.TYPES))
def test_every_type_is_encoded_so_that_llama_cpp_reads_back_exactly_lowbits_weights(name):
    kind = ggml.TYPES[name]
    w = ggml.quantize(_weights(), kind)
    blocks = encode(w)
    block_size, block_bytes = GGML_QUANT_SIZES[qtype(kind)]
    assert blocks.dtype == np.uint8 and blocks.shape == (48, 512 // block_size * block_bytes)
    assert int(w.c.max()) <= kind.c_max
    assert torch.equal(decode(blocks, kind), w.dequantize())


@pytest.mark.parametrize("name", list(EXACT))
def test_lowbits_own_grids_carry_over_code_for_code(name):
    bits, symmetric = EXACT[name]
    args = replace(make_scheme(bits, 32, symmetric).weights, scale_dtype="float16")
    qw = quantize(torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * 0.02, args)
    w = from_grid(qw)
    assert w.kind.name == name and torch.equal(w.c.to(torch.int16) - w.kind.mid, qw.q.to(torch.int16))
    got, exact = decode(encode(w), w.kind), qw.dequantize(torch.float32)
    if symmetric:  # float16 scales, as the scheme stores them: the same numbers
        assert torch.equal(got, exact)
    else:  # the offset m = −s·(8 + z) is rounded to float16: at most half a float16 step of |m|
        m = (qw.scale.float() * (8 + qw.zero_point.float())).abs().max()
        assert float((got - exact).abs().max()) <= 2**-11 * float(m) + 1e-7


def test_float32_scales_move_by_their_float16_rounding_only():
    qw = quantize(torch.randn(64, 256, generator=torch.Generator().manual_seed(1)), make_scheme(4, 32).weights)
    change = float16_change(qw)
    assert qw.scale.dtype == torch.float32 and 0 < change < 2**-11


def test_which_grids_a_type_holds():
    def kind(bits, group, symmetric=True):
        found = exact_type(make_scheme(bits, group, symmetric).weights, 256)
        return None if found is None else found.name

    assert (kind(4, 32), kind(4, 32, False), kind(8, 32)) == ("Q4_0", "Q4_1", "Q8_0")
    assert kind(4, 64) is None and kind(4, 0) is None and kind(3, 32) is None and kind(8, 0) is None
    for name in EXACT:  # and back: the grid a type is, as the runtime reads a file's blocks
        assert exact_type(exact_args(ggml.TYPES[name]), 256) is ggml.TYPES[name]


def _smollm2_like(preset, layers=30, hidden=576, ffn=1536):
    """llama.cpp's choice per tensor for a tied model of SmolLM2's shapes (9 heads, 3 KV heads)."""
    tensors = [Tensor("token_embd.weight", hidden)]
    for i in range(layers):
        tensors += [Tensor(f"blk.{i}.{n}.weight", hidden) for n in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                                     "ffn_gate", "ffn_up")]
        tensors.append(Tensor(f"blk.{i}.ffn_down.weight", ffn))
    types = tensor_types(preset, tensors, layers, 3, tied=True)
    return {name: None if kind is None else kind.name for name, kind in types.items()}


def test_a_preset_bumps_and_falls_back_as_llama_quantize_does():
    q4km = _smollm2_like("Q4_K_M")
    more_bits = [i for i in range(30) if i < 3 or i >= 26 or (i - 3) % 3 == 2]  # llama.cpp's use_more_bits(i, 30)
    for i in range(30):
        assert q4km[f"blk.{i}.attn_v.weight"] == ("Q8_0" if i in more_bits else "Q5_0")  # Q6_K / Q4_K need 256 | 576
        assert q4km[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if i in more_bits else "Q4_K")  # 1536 = 6 · 256
        assert q4km[f"blk.{i}.attn_q.weight"] == "Q5_0"
    assert q4km["token_embd.weight"] == "Q8_0"  # tied: the output's Q6_K, which falls back at 576
    q3km = _smollm2_like("Q3_K_M")
    assert [q3km[f"blk.{i}.ffn_down.weight"] for i in (0, 1, 2)] == ["Q5_K", "Q4_K", "Q4_K"]
    assert (q3km["blk.0.attn_v.weight"], q3km["blk.2.attn_v.weight"], q3km["blk.5.attn_output.weight"],
            q3km["blk.5.ffn_up.weight"]) == ("Q5_1", "Q5_0", "Q5_0", "Q4_0")
    q2k = _smollm2_like("Q2_K", hidden=512, ffn=1536)  # a width 256 divides: no fallback
    assert (q2k["blk.3.attn_q.weight"], q2k["blk.3.attn_v.weight"], q2k["blk.3.ffn_down.weight"],
            q2k["token_embd.weight"]) == ("Q2_K", "Q3_K", "Q3_K", "Q6_K")
    assert _smollm2_like("Q4_0", hidden=80)["blk.0.attn_q.weight"] is None  # 32 does not divide 80 either: F16


def _quantized_tiny(kind_name: str):
    model = make_model(128, hidden=64, intermediate=96)
    kind = ggml.TYPES[kind_name]
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            replace_module(model, name, GGMLLinear(ggml.quantize(module.weight.detach(), kind)))
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


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_k_quant_preset_is_rounded_layer_by_layer_onto_llama_cpps_mix_and_written_as_it_was_rounded(tmp_path, method):
    """Q4_K_M on a tiny Llama whose widths 256 divides: the pipeline rounds each linear onto the type llama.cpp
    gives it (Q6_K for attn_v / ffn_down in use_more_bits' layers, Q4_K elsewhere, the tied table Q6_K by RTN),
    and every tensor in the file reads back as exactly the weight lowbit computed."""
    from lowbit.algorithms import get_method
    from lowbit.formats.gguf.presets import search_scheme
    from lowbit.formats.gguf.writer import linear_types
    from lowbit.pipeline.quantize import quantize_model
    from lowbit.pipeline.recipe import Recipe

    model = make_model(128, hidden=256, intermediate=512, layers=8)
    arch = architecture_of(model)
    grids = {n: replace(k, actorder="weight") for n, k in linear_types(model, arch, "Q4_K_M").items() if k}
    recipe = Recipe(search_scheme("Q4_K_M", "weight"), get_method(method))
    calibration = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(model, recipe, calibration if method == "gptq" else None, grids=grids)
    written = write_gguf(model, arch, tmp_path / "q4km.gguf", TOKENIZER, "tiny", preset="Q4_K_M")
    _, tensors = _tensors(tmp_path / "q4km.gguf")
    more_bits = {0, 3, 6, 7}  # use_more_bits(i, 8)
    for i, layer in enumerate(model.model.layers):
        for gguf_name, module in (("attn_v", layer.self_attn.v_proj), ("ffn_down", layer.mlp.down_proj),
                                  ("ffn_up", layer.mlp.up_proj), ("attn_output", layer.self_attn.o_proj)):
            t = tensors[f"blk.{i}.{gguf_name}.weight"]
            bumped = gguf_name in ("attn_v", "ffn_down") and i in more_bits
            assert isinstance(module, GGMLLinear) and module.args.name == t.tensor_type.name == ("Q6_K" if bumped else "Q4_K")
            got = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).copy())
            assert torch.equal(got, module.quantized_weight().dequantize())
    assert tensors["token_embd.weight"].tensor_type.name == "Q6_K" and written.file_type == "Q4_K_M"
    assert written.types == {"Q4_K": 48, "Q6_K": 9, "F32": 17}  # 8 × 7 linears, 8 of them bumped; the table
    linears = [m for m in model.modules() if isinstance(m, GGMLLinear)]
    bits = {name: 8 * size / block for name, (block, size) in
            ((n, GGML_QUANT_SIZES[qtype(ggml.TYPES[n])]) for n in ("Q4_K", "Q6_K"))}  # 4.5 and 6.5625
    want = sum(bits[m.args.name] * m.weight_c.numel() for m in linears) / sum(m.weight_c.numel() for m in linears)
    assert written.bits_per_weight == pytest.approx(want, rel=1e-12)
