"""Activation quantization: int8 per token / per tensor and FP8 E4M3, as the matmuls will see them."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.schemes.activations import (
    FP8_MAX,
    check_activation_args,
    fake_quantize_activation,
    quantize_activation,
    static_scale,
)
from lowbit.schemes.args import QuantizationArgs

INT8_TOKEN = QuantizationArgs(num_bits=8, strategy="token", group_size=None, dynamic=True)
INT8_TENSOR = QuantizationArgs(num_bits=8, strategy="tensor", group_size=None)
FP8_TOKEN = QuantizationArgs(num_bits=8, type="float", strategy="token", group_size=None, dynamic=True)


def test_int8_per_token_uses_each_rows_range_and_the_symmetric_127_grid():
    torch.manual_seed(0)
    x = torch.randn(5, 64) * torch.tensor([1.0, 10.0, 0.1, 3.0, 100.0])[:, None]
    q, s = quantize_activation(x, INT8_TOKEN)
    assert q.dtype == torch.int8 and s.shape == (5, 1)
    assert torch.equal(q.abs().amax(dim=1), torch.full((5,), 127, dtype=torch.int8))  # each row's max lands on ±127
    assert torch.allclose(s[:, 0], x.abs().amax(dim=1) / 127)
    error = (fake_quantize_activation(x, INT8_TOKEN) - x).abs()
    assert torch.all(error <= s / 2 + 1e-6)  # round to nearest: at most half a step, per row


def test_a_static_per_tensor_scale_clamps_what_calibration_did_not_see():
    x = torch.tensor([[0.5, -1.0, 4.0]])
    scale = static_scale(torch.tensor(1.0), INT8_TENSOR)
    q, s = quantize_activation(x, INT8_TENSOR, scale)
    assert q.tolist() == [[64, -127, 127]] and float(s) == pytest.approx(1 / 127)


def test_fp8_per_token_is_e4m3_within_its_relative_precision():
    torch.manual_seed(0)
    x = torch.randn(4, 256) * 30
    q, s = quantize_activation(x, FP8_TOKEN)
    assert q.dtype == torch.float8_e4m3fn and float(q.float().abs().max()) == FP8_MAX
    x_hat = fake_quantize_activation(x, FP8_TOKEN)
    relative = ((x_hat - x).abs() / x.abs().clamp(min=s.max() * 2 ** -6)).max()
    assert relative <= 2 ** -4  # 3 mantissa bits: half a step is 2^-4 of the value (normal range)


def test_a_zero_row_stays_zero_and_finite():
    x = torch.zeros(2, 8)
    assert torch.equal(fake_quantize_activation(x, INT8_TOKEN), x)


@pytest.mark.parametrize("args, message", [
    (QuantizationArgs(num_bits=4, strategy="token", group_size=None, dynamic=True), "int8 or FP8"),
    (QuantizationArgs(num_bits=8, symmetric=False, strategy="token", group_size=None, dynamic=True), "symmetric"),
    (QuantizationArgs(num_bits=8, strategy="token", group_size=None, dynamic=False), "dynamic"),
    (QuantizationArgs(num_bits=8, strategy="group", group_size=32), "'token' or 'tensor'"),
])
def test_activation_schemes_that_cannot_run_are_refused_in_one_line(args, message):
    with pytest.raises(LowbitError, match=message):
        check_activation_args(args)
