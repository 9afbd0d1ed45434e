import shutil

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.models.loader import load_model, resolve


def test_pickle_checkpoints_are_refused_unless_allowed(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    torch.save(load_file(str(weights)), folder / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(LowbitError, match="--allow-pickle"):
        load_model(str(folder))
    loaded, _, _ = load_model(str(folder), allow_pickle=True)
    assert isinstance(loaded, torch.nn.Module)


def test_truncated_safetensors_is_reported_not_traced(tiny_model_dir, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(LowbitError, match="corrupt or truncated"):
        load_model(str(folder))


def test_garbage_safetensors_is_reported(tiny_model_dir, tmp_path):
    folder = tmp_path / "garbage"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(LowbitError, match="corrupt or truncated"):
        load_model(str(folder))


def test_missing_model_names_the_alternatives(tmp_path):
    with pytest.raises(LowbitError, match="smollm2-135m"):
        resolve(str(tmp_path / "nothing-here"))


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LowbitError, match="use it offline"):
        load_model("someorg/some-model-that-is-not-cached")


def test_an_unreachable_hub_is_reported_at_once_with_the_download_command(monkeypatch):
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(LowbitError, match=r"ConnectionRefusedError.*hf download someorg/not-cached --local-dir DIR"):
        load_model("someorg/not-cached")


def test_unsupported_architecture_lists_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lowbit import api
    from lowbit.schemes import make_scheme

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(folder)
    from ..conftest import make_tokenizer

    make_tokenizer().save_pretrained(folder)
    with pytest.raises(LowbitError, match="not supported; supported: .*llama"):
        api.quantize(str(folder), make_scheme(4, 32), method="rtn", output_dir=tmp_path / "o", progress=False)
