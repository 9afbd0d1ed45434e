"""The runtime's quantized KV caches: a prompt reads K and V exactly as decoding stores them, so prefill-then-decode
and one long prefill agree under every format; their bytes are what the format promises."""

import pytest
import torch

from lowbit.runtime.decoder import LeanDecoder
from lowbit.runtime.kv_cache import KVCache
from lowbit.schemes.kv_cache import FORMATS, kv_format

from ..conftest import make_model
from .test_decoder import _gemma3

CASES = ["int8", "fp8", "fp8 static", "int4"]


def _decoder(model, case: str, max_len: int = 192) -> LeanDecoder:
    name, static = case.split()[0], case.endswith("static")
    layers = len(model.model.layers)
    scales = (torch.full((layers,), 0.05), torch.full((layers,), 0.02)) if static else None
    return LeanDecoder(model, max_len=max_len, dtype=torch.float32, kv_cache=name, kv_scales=scales)


@pytest.fixture(scope="module")
def llama(tiny_tokenizer):
    return make_model(len(tiny_tokenizer), hidden=128, intermediate=256)


@pytest.mark.parametrize("family", ["llama", "gemma3 window 8"])
@pytest.mark.parametrize("case", CASES)
def test_prefill_then_decode_equals_one_long_prefill(llama, tiny_tokenizer, family, case):
    """150 positions cross int4's group boundaries at 64 and 128 inside the prompt, inside a later chunk and
    during single-token steps."""
    model = llama if family == "llama" else _gemma3(len(tiny_tokenizer), window=8)
    ids = torch.randint(0, model.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(1))
    decoder = _decoder(model, case)
    full = decoder(ids, 0, last_only=False)[0]
    decoder(ids[:, :70], 0)
    chunk = decoder(ids[:, 70:120], 70, last_only=False)[0]
    steps = torch.stack([decoder(ids[:, i : i + 1], i)[0, -1] for i in range(120, 150)])
    torch.testing.assert_close(torch.cat([chunk, steps]), full[70:], rtol=0, atol=1e-3 * float(full.abs().max()))


def test_quantized_caches_stay_close_to_bf16_in_the_order_of_their_bits(llama):
    ids = torch.randint(0, llama.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(2))
    ref = LeanDecoder(llama, max_len=192, dtype=torch.float32)(ids, 0, last_only=False)[0]
    err = {c: float((_decoder(llama, c)(ids, 0, last_only=False)[0] - ref).abs().max()) / float(ref.abs().max())
           for c in ("int8", "fp8", "int4")}
    assert err["int8"] < 0.01 and err["fp8"] < 0.05 and err["int4"] < 0.15
    assert err["int8"] < err["fp8"] and err["int8"] < err["int4"]


@pytest.mark.parametrize("name", list(FORMATS))
def test_cache_bytes_are_the_formats_bytes_per_token(name):
    layers, heads, N, d = 4, 2, 256, 64
    fmt = kv_format(name)
    cache = KVCache(fmt, layers, heads, N, d)
    residual = 2 * layers * heads * fmt.group * d * 2 if name == "int4" else 0  # int4's bf16 group, per layer
    assert cache.nbytes() == fmt.bytes_per_token(layers, heads, d) * N + residual
    static = KVCache(fmt, layers, heads, N, d, (torch.ones(layers), torch.ones(layers))) if fmt.per_token else None
    if static is not None:
        assert static.nbytes() == fmt.bytes_per_token(layers, heads, d, static=True) * N + 2 * layers * 4


def test_the_decoder_names_its_cache_and_says_the_compiled_step_does_not_take_it_yet(llama):
    decoder = _decoder(llama, "int4", max_len=64)
    assert decoder.kernels()["KV cache"] == "int4 (keys per channel over 64 positions, values per position)"
    assert "int4 KV cache is not in the compiled step" in decoder.kernels()["decode step"]
    assert _decoder(llama, "fp8 static", max_len=64).kernels()["KV cache"] == "fp8 (static scales)"
