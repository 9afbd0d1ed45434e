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
    """head_dim 64: int8 keys in two blocks of 32 (the Gemma 3 case below: head_dim 32, one scale a row)."""
    return make_model(len(tiny_tokenizer), hidden=256, intermediate=256)


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


@pytest.mark.parametrize("case", CASES)
def test_the_compiled_step_stores_the_codes_and_scales_python_stores_and_reads_them_alike(llama, case):
    """Decoding positions 30 … 139 (int4: the groups ending at 63 and 127 quantized by the compiled step, the
    rest of the last one in its bf16 residual)."""
    ids = torch.randint(0, llama.config.vocab_size, (1, 140), generator=torch.Generator().manual_seed(5))
    compiled, python = _decoder(llama, case, max_len=160), _decoder(llama, case, max_len=160)
    if compiled.step is None:
        pytest.skip(f"no compiled step here: {compiled.step_unavailable}")
    python.step = None  # the PyTorch step: quantize_tokens / quantize_asymmetric and SDPA over the dequantized cache
    for d in (compiled, python):
        d(ids[:, :30], 0)
    a = torch.stack([compiled(ids[:, i : i + 1], i)[0, -1] for i in range(30, 140)])
    b = torch.stack([python(ids[:, i : i + 1], i)[0, -1] for i in range(30, 140)])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(b.abs().max()))
    for name, x in compiled.cache.named_buffers():  # the same cache up to a rare code one step apart (k, v from
        y = python.cache.get_buffer(name).float()   # another GEMV's rounding)
        assert float((x.float() != y).float().mean()) < 0.005, name
        if x.dtype != torch.uint8:  # packed pairs of codes compare as codes above
            assert float((x.float() - y).abs().max()) <= 0.1 * float(y.abs().max()), name


@pytest.mark.parametrize("case", ["int8", "int8 keys", "fp8", "fp8 static"])
def test_the_compiled_cache_stores_exactly_what_quantize_tokens_computes(case):
    """int8 keys: a scale per block of 32 channels."""
    from lowbit.runtime.native import native_module
    from lowbit.schemes.kv_cache import quantize_tokens

    module = native_module()
    if module is None:
        pytest.skip("no native kernels here")
    torch.manual_seed(0)
    x = torch.randn(200, 64) * torch.logspace(-6, 3, 200)[:, None]  # down to scales at fp16's floor
    x[7] = 0.0
    x[9, 40:] = 0.0  # one block of a row all zero
    fmt, static = kv_format(case.split()[0]), (0.05 if case.endswith("static") else None)
    block = fmt.key_block_of(64) if case.endswith("keys") else None
    codes, scales = quantize_tokens(x, fmt, static, block)
    like = torch.empty(0, dtype=codes.dtype)
    ours, our_scales = module.kv_store_rows(x, like, static or 0.0, block or 0)
    assert torch.equal(ours.view(torch.uint8), codes.view(torch.uint8))
    assert (our_scales.numel() == 0) if static else torch.equal(our_scales, scales)


def test_the_compiled_step_floors_query_scales_as_quantize_query_does():
    from lowbit.runtime.native import native_module
    from lowbit.schemes.kv_cache import QUERY_SCALE_FLOOR

    module = native_module()
    if module is None:
        pytest.skip("no native kernels here")
    assert module.QUERY_SCALE_FLOOR == QUERY_SCALE_FLOOR


def test_the_int4_cache_stores_exactly_what_quantize_asymmetric_computes():
    from lowbit.runtime.native import native_module
    from lowbit.schemes.kv_cache import pack_nibbles, quantize_asymmetric

    module = native_module()
    if module is None:
        pytest.skip("no native kernels here")
    torch.manual_seed(0)
    x = (torch.randn(64, 48) * torch.logspace(-5, 2, 48)).to(torch.bfloat16)  # channels down to fp16's scale floor
    x[:, 5] = 0.0
    x[9] = 1.0  # a position whose values are all equal
    for per_channel, dim in ((True, -2), (False, -1)):
        codes, s, m = quantize_asymmetric(x.float(), dim)
        packed, ours_s, ours_m = module.kv_int4_rows(x, per_channel)
        assert torch.equal(packed, pack_nibbles(codes))
        assert torch.equal(ours_s, s.flatten()) and torch.equal(ours_m, m.flatten())


def test_the_decoder_names_its_cache_and_its_compiled_step_takes_every_format(llama):
    decoder = _decoder(llama, "int4", max_len=64)
    assert decoder.kernels()["KV cache"] == "int4 (keys per channel over 64 positions, values per position)"
    if decoder.step_unavailable is None:
        assert decoder.kernels()["decode step"].startswith("compiled")
    assert _decoder(llama, "fp8 static", max_len=64).kernels()["KV cache"] == "fp8 (calibrated static scales)"
