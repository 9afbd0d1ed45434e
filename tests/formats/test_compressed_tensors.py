import errno
import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
from safetensors.torch import load_file

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.formats import compressed_tensors as ct_format
from lowbit.models.loader import load_model
from lowbit.schemes import make_scheme


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture()
def ids(tiny_tokenizer):
    return tiny_tokenizer("a single man in possession of a good fortune", return_tensors="pt").input_ids


def quantize_tiny(tiny_model_dir, out, scheme, method="rtn", **kw):
    return api.quantize(
        str(tiny_model_dir), scheme, method=method, output_dir=out, progress=False, return_model=True, **kw
    )


@pytest.mark.parametrize(
    "scheme", [make_scheme(4, 32), make_scheme(8, None), make_scheme(3, 32, False), make_scheme(2, 16, False)]
)
def test_lowbit_reloads_its_checkpoint_with_identical_logits(tiny_model_dir, tmp_path, ids, scheme):
    result, model, _ = quantize_tiny(tiny_model_dir, tmp_path / "q", scheme)
    reloaded, _, source = load_model(str(tmp_path / "q"))
    assert source.quantized
    assert torch.equal(logits(model, ids), logits(reloaded, ids))
    assert result.size_bytes > 0


def test_config_is_a_valid_compressed_tensors_config_and_names_follow_the_format(tiny_model_dir, tmp_path):
    quantize_tiny(tiny_model_dir, tmp_path / "q", make_scheme(4, 64, False))
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    assert qc.format == "pack-quantized"
    assert "lm_head" in qc.ignore
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{name}.weight_packed"].dtype == torch.int32
    assert tensors[f"{name}.weight_shape"].tolist() == [96, 96]
    assert {f"{name}.weight_scale", f"{name}.weight_zero_point"} <= tensors.keys()
    record = json.loads((tmp_path / "q" / ct_format.RECORD_FILE).read_text())
    assert record["method"] == "rtn" and record["weights"]["num_bits"] == 4 and "lowbit_version" in record


def test_group_size_fallback_is_reported_and_recorded(tiny_model_dir, tmp_path):
    result, _, _ = quantize_tiny(tiny_model_dir, tmp_path / "q", make_scheme(4, 64))
    # hidden 96 is not a multiple of 64: q/k/v/o/gate/up fall back to 32; down_proj (in 128) keeps 64
    assert any("q_proj" in f and "g32" in f for f in result.fallbacks)
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    sizes = sorted(g["weights"]["group_size"] for g in config["config_groups"].values())
    assert sizes == [32, 64]


def test_compressed_tensors_decompresses_asymmetric_layers_to_lowbit_weights(tiny_model_dir, tmp_path):
    _, model, _ = quantize_tiny(tiny_model_dir, tmp_path / "q", make_scheme(3, 32, False))
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    group = next(iter(config["config_groups"].values()))
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    name = "model.layers.1.mlp.down_proj"
    local = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
    dense = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    layer = model.get_submodule(name)
    torch.testing.assert_close(dense, layer.quantized_weight().dequantize(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", [make_scheme(4, 32), make_scheme(8, None), make_scheme(4, 64)])
def test_transformers_loads_the_checkpoint_with_the_same_logits(tiny_model_dir, tmp_path, ids, scheme):
    from transformers import AutoModelForCausalLM

    _, model, _ = quantize_tiny(tiny_model_dir, tmp_path / "q", scheme)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_disk_full_while_saving_leaves_no_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    def full_disk(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ct_format, "save_file", full_disk)
    with pytest.raises(LowbitError, match="disk full"):
        quantize_tiny(tiny_model_dir, tmp_path / "q", make_scheme(4, 32))
    assert list(tmp_path.iterdir()) == []


def test_lm_head_is_quantized_only_when_asked_and_the_checkpoint_still_loads(tiny_model_dir, tmp_path, ids):
    from transformers import AutoModelForCausalLM

    from lowbit.quantized.modules import QuantLinear

    _, model, _ = quantize_tiny(tiny_model_dir, tmp_path / "q", make_scheme(4, 32), include_lm_head=True)
    assert isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.model.embed_tokens.weight, torch.nn.Parameter)
    reloaded, _, _ = load_model(str(tmp_path / "q"))
    assert isinstance(reloaded.lm_head, QuantLinear)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_a_calibrated_kv_cache_is_saved_as_compressed_tensors_names_it_and_loaded_back(tiny_model_dir, tmp_path, ids):
    """kv_cache_scheme fp8 per-tensor static and each attention's k_scale / v_scale [1] (the names vLLM reads);
    lowbit reloads the scales; transformers loads the checkpoint and runs its weights, ignoring the scales."""
    from transformers import AutoModelForCausalLM

    _, model, _ = quantize_tiny(tiny_model_dir, tmp_path / "q", make_scheme(4, 32), kv_cache="fp8",
                                calib="shakespeare", nsamples=4, seqlen=32)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    kv = QuantizationConfig.model_validate(config["quantization_config"]).kv_cache_scheme
    assert (kv.num_bits, kv.type, kv.strategy, kv.dynamic) == (8, "float", "tensor", False)
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    for i, layer in enumerate(model.model.layers):
        for name in ("k_scale", "v_scale"):
            saved = tensors[f"model.layers.{i}.self_attn.{name}"]
            assert saved.shape == (1,) and saved.dtype == torch.float32
            assert torch.equal(saved, getattr(layer.self_attn, name)) and float(saved) > 0
    reloaded, _, _ = load_model(str(tmp_path / "q"))
    assert torch.equal(reloaded.model.layers[1].self_attn.v_scale, model.model.layers[1].self_attn.v_scale)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_a_kv_cache_scheme_lowbit_does_not_run_is_refused_on_load(tiny_model_dir, tmp_path):
    quantize_tiny(tiny_model_dir, tmp_path / "q", make_scheme(4, 32), kv_cache="fp8", calib="shakespeare",
                  nsamples=2, seqlen=16)
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["kv_cache_scheme"].update(type="int", dynamic=True)
    path.write_text(json.dumps(config))
    with pytest.raises(LowbitError, match="kv_cache_scheme int8 sym per-tensor dynamic is not one lowbit runs"):
        load_model(str(tmp_path / "q"))
