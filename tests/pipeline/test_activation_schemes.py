"""W8A8 / W4A8 end to end on a tiny model: SmoothQuant, static scales, the checkpoint, and the runtime's numerics."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file

from lowbit import FP8, FP8_DYNAMIC, LLM, W4A8, W8A8, W8A8_STATIC, SamplingParams, api
from lowbit.algorithms import get_method
from lowbit.errors import LowbitError
from lowbit.models.loader import load_model
from lowbit.pipeline.quantize import quantize_model
from lowbit.pipeline.recipe import Recipe
from lowbit.quantized.modules import QuantLinear
from lowbit.runtime.decoder import LeanDecoder
from lowbit.runtime.kernels import InputQuantLinear, Int8Linear
from lowbit.schemes import make_scheme

from ..conftest import make_outlier_model

CALIB = dict(calib="shakespeare", nsamples=4, seqlen=32)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def test_w8a8_checkpoint_reloads_with_its_activation_scheme_and_compressed_tensors_parses_it(tiny_model_dir, tmp_path):
    out = tmp_path / "w8a8"
    _, model, _ = api.quantize(str(tiny_model_dir), W8A8(), method="rtn", output_dir=out, progress=False,
                               return_model=True)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)
    acts = next(iter(parsed.config_groups.values())).input_activations
    assert (acts.num_bits, acts.strategy, acts.dynamic, acts.type) == (8, "token", True, "int")
    assert parsed.format == "int-quantized" and "lm_head" in parsed.ignore
    reloaded, _, _ = load_model(str(out))
    q_proj = reloaded.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q_proj, QuantLinear) and q_proj.input_args == W8A8().input_activations
    ids = torch.arange(3, 40)[None]
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))
    llm = LLM(str(out), max_model_len=64)
    assert not llm.notices  # no slower path: every linear runs int8 x int8
    assert all("int8 x int8" in llm.kernels()[kind] for kind in ("qkv", "o_proj", "gate_up", "down_proj"))
    greedy = llm.generate("It is a truth", SamplingParams(temperature=0, max_tokens=6))[0]
    assert greedy.token_ids and greedy.finish_reason in ("length", "stop")


def test_static_scales_with_smoothquant_auto_are_calibrated_shared_saved_and_recorded(tiny_model_dir, tmp_path):
    out = tmp_path / "w8a8-static"
    _, model, _ = api.quantize(str(tiny_model_dir), W8A8_STATIC(), method="gptq", output_dir=out, progress=False,
                               return_model=True, smoothquant="auto", **CALIB)
    tensors = load_file(str(out / "model.safetensors"))
    block = "model.layers.0"
    qkv = [tensors[f"{block}.self_attn.{p}_proj.input_scale"] for p in "qkv"]
    assert qkv[0].shape == (1,) and float(qkv[0]) > 0 and all(torch.equal(s, qkv[0]) for s in qkv)
    assert torch.equal(tensors[f"{block}.mlp.gate_proj.input_scale"], tensors[f"{block}.mlp.up_proj.input_scale"])
    assert not any(k.startswith("lm_head") and k.endswith("input_scale") for k in tensors)
    record = json.loads((out / "lowbit_recipe.json").read_text())
    assert record["smoothquant"] == "auto" and record["input_activations"]["strategy"] == "tensor"
    alphas = record["smoothquant_alpha"]
    assert {f"model.layers.{i}.input_layernorm" for i in range(2)} <= alphas.keys()
    assert all(a is None or 0.0 <= a <= 1.0 for a in alphas.values())
    reloaded, _, _ = load_model(str(out))
    ids = torch.arange(3, 40)[None]
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))


def _outlier_model(vocab: int):
    """A tiny Llama whose norms give three channels 30x the rest: activation quantization then matters."""
    return make_outlier_model(vocab)


@pytest.mark.parametrize("scheme, kind", [(W8A8(), Int8Linear), (W8A8_STATIC(), Int8Linear),
                                          (W4A8(group_size=64), InputQuantLinear)])
def test_the_runtime_quantizes_activations_as_evaluation_does(tiny_tokenizer, scheme, kind):
    """The runtime computes from the integers evaluation fake-quantizes: W8A8 layers (int8 x int8 kernel) agree
    with evaluation to float32 rounding, prefill and decode; W4A8 (fake-quantized inputs, then the weight-only
    kernel) to well within what quantizing the input changes. Over the whole model, where an input a float32
    rounding apart from evaluation's may round to the next int8 step (30x outliers make steps coarse here), the
    logits of prefill and of the decode step are much closer to evaluation's A8 logits than to weight-only ones.
    (tests/integration compares perplexities on the real model.)"""
    vocab = len(tiny_tokenizer)
    calibration = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(1))
    model, weights_only = _outlier_model(vocab), _outlier_model(vocab)
    quantize_model(model, Recipe(scheme, get_method("rtn")), calibration if not scheme.input_activations.dynamic else None)
    quantize_model(weights_only, Recipe(replace(scheme, input_activations=None), get_method("rtn")))
    ids = torch.randint(0, vocab, (1, 24), generator=torch.Generator().manual_seed(2))
    # float32 compute on every CPU: a bf16 one (Zen 4) would add its own rounding, as large here as what the A8
    # inputs change, and this compares the inputs' quantization
    decoder = LeanDecoder(model, max_len=64, dtype=torch.float32)
    x = torch.randn(24, 128) * torch.cat([torch.full((3,), 30.0), torch.ones(125)])
    o_proj = model.get_submodule("model.layers.0.self_attn.o_proj")
    runtime_o = decoder.blocks[0].o
    assert isinstance(runtime_o, kind)
    with torch.no_grad():
        exact, weight_only = o_proj(x), F.linear(x, o_proj.quantized_weight().dequantize(torch.float32))
        gap = float((runtime_o(x) - exact).abs().max())
        one_row = torch.cat([runtime_o(x[t : t + 1]) for t in range(3)])
    if kind is Int8Linear:
        assert gap < 1e-5 * float(exact.abs().max())
        assert torch.allclose(one_row, exact[:3], rtol=0, atol=1e-5 * float(exact.abs().max()))
    else:
        assert gap < 0.1 * float((weight_only - exact).abs().max())
    evaluated, without = _logits(model, ids), _logits(weights_only, ids)
    prefill = decoder(ids, 0, last_only=False)[0]
    assert float((prefill - evaluated).abs().mean()) < 0.5 * float((prefill - without).abs().mean())
    decoder(ids[:, :12], 0)  # then the compiled decode step, token by token
    stepped = torch.cat([decoder(ids[:, t : t + 1], t)[0] for t in range(12, 24)])
    assert float((stepped - evaluated[12:]).abs().mean()) < 0.5 * float((stepped - without[12:]).abs().mean())


@pytest.mark.parametrize("smoothquant, scheme, method, message", [
    (0.5, make_scheme(8, None), "rtn", "choose an activation scheme"),
    (1.5, W8A8(), "rtn", "between 0 and 1"),
    ("auto", W8A8(), "awq", "choose rtn or gptq"),
])
def test_smoothquant_misuse_is_refused_before_any_work(tiny_model_dir, tmp_path, smoothquant, scheme, method, message):
    with pytest.raises(LowbitError, match=message):
        api.quantize(str(tiny_model_dir), scheme, method=method, output_dir=tmp_path / "x", progress=False,
                     smoothquant=smoothquant, **CALIB)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("scheme", [W8A8(), W8A8_STATIC()])
def test_transformers_loads_w8a8_checkpoints_on_cpu_and_quantizes_their_inputs(tiny_model_dir, tmp_path, scheme):
    """transformers (through compressed-tensors) decompresses the int8 weights and fake-quantizes each input over
    [-128, 127], dynamic scales being max|x| / 127.5, where lowbit and vLLM clamp to ±127 and divide by 127: its
    logits differ from lowbit's by a rounding step here and there."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ckpt"
    kw = CALIB if not scheme.input_activations.dynamic else {}
    api.quantize(str(tiny_model_dir), scheme, method="rtn", output_dir=out, progress=False, **kw)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    mine, _, _ = load_model(str(out))
    ids = torch.arange(3, 40)[None]
    a, b = _logits(theirs, ids), _logits(mine, ids)
    assert float((a - b).abs().max()) < 0.02 * float(b.abs().max())


@pytest.mark.parametrize("scheme", [FP8_DYNAMIC(), FP8()], ids=["FP8_DYNAMIC", "FP8"])
def test_fp8_checkpoints_are_float_quantized_and_every_consumer_computes_the_same(tiny_model_dir, tmp_path, scheme):
    """FP8_DYNAMIC needs no data; FP8 calibrates its static input scales. On disk: float8_e4m3fn weights, a
    scale per channel or one per tensor; transformers computes exactly lowbit's evaluation logits; the runtime
    runs them (upcast: it says FP8 is for accuracy on CPU) and agrees with evaluation."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fp8"
    kw = {} if scheme.input_activations.dynamic else CALIB
    _, model, _ = api.quantize(str(tiny_model_dir), scheme, method="rtn", output_dir=out, progress=False,
                               return_model=True, **kw)
    parsed = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    group = next(iter(parsed.config_groups.values()))
    assert parsed.format == "float-quantized" and group.input_activations.type == "float"
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{name}.weight"].dtype == torch.float8_e4m3fn
    rows = tensors[f"{name}.weight"].shape[0]
    assert tensors[f"{name}.weight_scale"].shape == ((1,) if scheme.weights.strategy == "tensor" else (rows, 1))
    ids = torch.arange(3, 40)[None]
    evaluated = _logits(model, ids)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    torch.testing.assert_close(_logits(theirs, ids), evaluated, rtol=0, atol=1e-5)
    llm = LLM(str(out), max_model_len=64)
    assert any("no FP8 arithmetic on CPU" in line for line in llm.notices)
    ran = llm.decoder(ids, 0, last_only=False)[0]
    torch.testing.assert_close(ran, evaluated, rtol=0, atol=2e-2 * float(evaluated.abs().max()))


def test_fp8_at_load_time_is_dynamic_fp8_w8a8_on_every_decoder_linear(tiny_model_dir):
    """``LLM(..., quantization="fp8")`` as serving engines mean it: per-tensor FP8 weights, each call's input in FP8
    with a scale of its own; the output projection is not FP8."""
    llm = LLM(str(tiny_model_dir), quantization="fp8", max_model_len=64)
    kernels = llm.kernels()
    assert all("fp8 per-tensor dynamic inputs" in kernels[k] and "fp8 upcast" in kernels[k]
               for k in ("qkv", "o_proj", "gate_up", "down_proj"))
    assert "fp8" not in kernels["lm_head"]
    assert any("FP8 inputs" in line for line in llm.notices)
    out = llm.generate("It is a truth", SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(out.token_ids) == 4 or out.finish_reason == "stop"
