"""KV cache formats: each one's stored values within its grid's error, bytes per token as the issue counts them."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.schemes.kv_cache import (
    FORMATS,
    SCALE_FLOOR,
    dequantize_asymmetric,
    dequantize_tokens,
    kv_format,
    pack_nibbles,
    QUERY_SCALE_FLOOR,
    quantize_asymmetric,
    quantize_query,
    quantize_tokens,
    quantized_end,
    unpack_nibbles,
)


def _heads(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(3, 40, 64) * torch.logspace(-2, 2, 40)[None, :, None]  # positions over four decades
    x[0, 5, 7] = 300.0  # a key outlier
    return x


def test_int8_per_position_is_within_half_a_step_of_its_own_scale():
    x = _heads()
    c, s = quantize_tokens(x, kv_format("int8"))
    assert c.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (3, 40)
    assert int(c.abs().amax(-1).min()) >= 126  # the fp16-rounded scale still spends the range
    err = (dequantize_tokens(c, s) - x).abs()
    assert torch.all(err <= s.float()[..., None] / 2 * (1 + 1e-6))


def test_int8_keys_per_block_keep_an_outlier_channel_to_its_own_block():
    x = _heads()
    fmt = kv_format("int8")
    block = fmt.key_block_of(64)
    c, s = quantize_tokens(x, fmt, block=block)
    assert block == 32 and s.shape == (3, 40, 2) and s.dtype == torch.float16
    assert float(s[0, 5, 0]) == pytest.approx(300.0 / 127, rel=1e-3)  # the outlier's block (channel 7) …
    assert float(s[0, 5, 1]) < 0.05 * float(s[0, 5, 0])  # … leaves the other block its own fine scale
    x_hat = dequantize_tokens(c, s, block=block)
    assert torch.all((x_hat - x).abs() <= s.float().repeat_interleave(32, -1) / 2 * (1 + 1e-6))
    assert fmt.key_block_of(24) is None and fmt.key_block_of(32) is None and kv_format("fp8").key_block_of(64) is None


def test_a_query_reading_int8_keys_is_quantized_per_block_and_its_scores_are_integer_dots():
    torch.manual_seed(3)
    fmt = kv_format("int8")
    q, k = torch.randn(4, 64) * 3, torch.randn(10, 64)
    q[1, 32:] = 0.0  # an all-zero block stays zero
    q_hat = quantize_query(q, fmt)
    s_q = (q.unflatten(-1, (2, 32)).abs().amax(-1) / 127).clamp_min(QUERY_SCALE_FLOOR)
    c_q = (q_hat.unflatten(-1, (2, 32)) / s_q[..., None]).round()
    assert torch.all((q_hat - q).abs() <= s_q.repeat_interleave(32, -1) / 2 * (1 + 1e-6))
    assert torch.all(q_hat[1, 32:] == 0) and c_q.abs().max() <= 127
    c_k, s_k = quantize_tokens(k, fmt, block=32)
    ints = torch.einsum("qbj,kbj->qkb", c_q.double(), c_k.double().unflatten(-1, (2, 32)))
    scores = (ints * s_q.double()[:, None] * s_k.double()[None]).sum(-1)
    reads = q_hat.double() @ dequantize_tokens(c_k, s_k, block=32).double().T  # q̂, k̂ rounded to float32
    torch.testing.assert_close(reads, scores, rtol=1e-5, atol=1e-6)
    assert quantize_query(q, kv_format("fp8")) is q and quantize_query(q, kv_format("bf16")) is q


def test_fp8_dynamic_and_static_keep_e4m3_relative_precision():
    x = _heads()
    fmt = kv_format("fp8")
    c, s = quantize_tokens(x, fmt)
    assert c.dtype == torch.float8_e4m3fn
    rel = ((dequantize_tokens(c, s) - x).abs() / x.abs().clamp(min=1e-3 * x.abs().amax(-1, keepdim=True)))
    assert float(rel.max()) <= 2**-4 + 1e-6  # 3 mantissa bits: half a step is 1/16 of the value
    static = float(x.abs().amax()) / 448
    cs, none = quantize_tokens(x, fmt, static_scale=static)
    assert none is None
    big = x.abs() > 0.1
    assert float(((dequantize_tokens(cs, None, static) - x).abs() / x.abs())[big].max()) <= 2**-4 + 1e-6


def test_int8_scale_never_underflows_on_an_all_zero_head():
    c, s = quantize_tokens(torch.zeros(2, 64), kv_format("int8"))
    assert torch.all(s.float() == SCALE_FLOOR) and torch.all(c == 0)
    assert torch.equal(dequantize_tokens(c, s), torch.zeros(2, 64))


def test_int4_keys_per_channel_and_values_per_position_are_within_half_a_step():
    x = _heads()[:, :32]
    for dim in (-2, -1):  # keys: a group of positions per channel; values: per position
        c, s, m = quantize_asymmetric(x, dim)
        assert c.dtype == torch.uint8 and int(c.max()) <= 15
        assert s.shape[dim] == 1 and m.shape == s.shape
        err = (dequantize_asymmetric(c, s, m) - x).abs()
        assert torch.all(err <= s.float() / 2 + 1e-3 * s.float() + 2e-3 * x.abs())  # + fp16's rounding of m


def test_nibbles_round_trip_and_match_the_documented_layout():
    c = torch.randint(0, 16, (2, 5, 64), dtype=torch.uint8)
    packed = pack_nibbles(c)
    assert packed.shape == (2, 5, 32)
    assert int(packed[0, 0, 3]) == int(c[0, 0, 6]) | int(c[0, 0, 7]) << 4
    assert torch.equal(unpack_nibbles(packed), c)


def test_a_query_reads_only_whole_stored_groups_quantized():
    assert [quantized_end(t, 4) for t in range(9)] == [0, 0, 0, 4, 4, 4, 4, 8, 8]


def test_bytes_per_token_meet_the_issue_s_ratios_for_smollm2_and_gemma():
    for layers, kv_heads, d in ((30, 3, 64), (18, 1, 256)):
        bf16 = FORMATS["bf16"].bytes_per_token(layers, kv_heads, d)
        assert bf16 == layers * kv_heads * 4 * d
        assert FORMATS["int8"].bytes_per_token(layers, kv_heads, d) / bf16 <= 0.53
        assert FORMATS["fp8"].bytes_per_token(layers, kv_heads, d, static=True) / bf16 == 0.5
        assert FORMATS["int4"].bytes_per_token(layers, kv_heads, d) / bf16 <= 0.3


def test_an_unknown_format_is_one_line_naming_the_choices():
    with pytest.raises(LowbitError, match="bf16, int8, fp8, int4"):
        kv_format("q4_0")
