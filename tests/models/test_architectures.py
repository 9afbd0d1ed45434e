"""Every family in the architecture table resolves in transformers' real module tree."""

import pytest
import torch

from lowbit.models.architectures import ARCHITECTURES

TINY = dict(vocab_size=262208,  # meta tensors cost nothing; above every default pad/eos id
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


def _meta_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **TINY)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_path_of_the_record_names_a_real_module(model_type):
    arch = ARCHITECTURES[model_type]
    model = _meta_model(model_type)
    blocks = model.get_submodule(arch.blocks)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == 2
    model.get_submodule(arch.final_norm)
    assert isinstance(model.get_submodule(arch.lm_head), torch.nn.Linear)
    block = blocks[0]
    linears = {name for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    for s in arch.smoothing:
        previous = block.get_submodule(s.previous)
        block.get_submodule(s.inspect)
        for name in s.balance:
            assert name in linears, f"{model_type}: {name} is not a Linear of the block"
            width = block.get_submodule(name).in_features
            if isinstance(previous, torch.nn.Linear):  # v → o under GQA is narrower; AWQ skips such a pair
                assert width % previous.out_features == 0, f"{model_type}: {s.previous} does not feed {name}"
            else:
                assert width == previous.weight.shape[0], f"{model_type}: {s.previous} does not feed {name}"


@pytest.mark.parametrize("model_type", sorted(t for t, a in ARCHITECTURES.items() if a.lean is not None))
def test_the_lean_layout_names_the_real_modules(model_type):
    from dataclasses import fields

    arch = ARCHITECTURES[model_type]
    model = _meta_model(model_type)
    model.get_submodule(arch.embed), model.get_submodule(arch.rotary)
    block = model.get_submodule(arch.blocks)[0]
    for f in fields(arch.lean):
        path = getattr(arch.lean, f.name)
        if path is not None:
            module = block.get_submodule(path)
            assert isinstance(module, torch.nn.Linear) == (f.name in "q k v o gate up down".split()), path
    unclaimed = {n for n, m in block.named_modules() if "norm" in type(m).__name__.lower()}
    claimed = {getattr(arch.lean, f.name) for f in fields(arch.lean)}
    assert unclaimed <= claimed, f"{model_type}: norms the lean decoder would skip: {unclaimed - claimed}"


def test_an_unsupported_family_names_the_supported_ones():
    from lowbit.errors import LowbitError
    from lowbit.models.architectures import architecture_of

    model = torch.nn.Module()
    model.config = type("Config", (), {"model_type": "gpt2"})()
    with pytest.raises(LowbitError, match="'gpt2' is not supported; supported: .*llama"):
        architecture_of(model)
