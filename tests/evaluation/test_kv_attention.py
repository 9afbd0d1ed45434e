"""Evaluation through a KV cache format computes what the runtime computes over that cache."""

import pytest
import torch

from lowbit.evaluation.kv_attention import use_kv_cache_format
from lowbit.runtime.decoder import LeanDecoder
from lowbit.runtime.kv_cache import calibrated_scales

from ..conftest import make_model
from ..runtime.test_decoder import _gemma3


@pytest.mark.parametrize("family", ["llama", "gemma3 window 8"])
@pytest.mark.parametrize("case", ["bf16", "int8", "fp8", "fp8 static", "int4"])
def test_evaluation_reads_k_and_v_exactly_as_the_runtime_cache_stores_them(tiny_tokenizer, family, case):
    """150 positions: two whole int4 groups of 64 and a partial one, read quantized or in bf16 by position; "fp8
    static": the attention modules carry calibrated k_scale / v_scale, as a checkpoint's do."""
    model = make_model(len(tiny_tokenizer), hidden=128, intermediate=256) if family == "llama" else _gemma3(
        len(tiny_tokenizer), window=8)
    fmt = case.split()[0]
    if case.endswith("static"):
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.register_buffer("k_scale", torch.tensor([0.004 * (i + 1)]))
            layer.self_attn.register_buffer("v_scale", torch.tensor([0.002 * (i + 1)]))
    ids = torch.randint(0, model.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(input_ids=ids).logits[0]
    scales = calibrated_scales(model)
    assert (scales is not None) == case.endswith("static")
    ran = LeanDecoder(model, max_len=160, dtype=torch.float32, kv_cache=fmt, kv_scales=scales)(ids, 0, last_only=False)[0]
    use_kv_cache_format(model, fmt)
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits[0]
    scale = float(ran.abs().max())
    torch.testing.assert_close(evaluated, ran, rtol=0, atol=1e-4 * scale)
    assert float((evaluated - plain).abs().max()) > 1e-4 * scale  # the format changed what attention read


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_joins_no_int4_group(tiny_tokenizer, side):
    model = make_model(len(tiny_tokenizer), hidden=128, intermediate=256)
    use_kv_cache_format(model, "int4")
    ids = torch.randint(0, model.config.vocab_size, (2, 140), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 140, dtype=torch.long)
    real = slice(0, 100) if side == "right" else slice(40, 140)
    mask[1] = 0
    mask[1, real] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[1, real]
        alone = model(input_ids=ids[1:, real]).logits[0]
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-4 * float(alone.abs().max()))
