import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.schemes import QuantizationArgs, dequantize, make_scheme, quantize
from lowbit.schemes.grid import resolve_group_size


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [None, 32])
def test_codes_stay_on_the_grid_and_error_is_bounded_by_half_a_step(bits, symmetric, group):
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    args = make_scheme(bits, group, symmetric, observer="minmax").weights
    qw = quantize(w, args)
    assert qw.q.dtype == torch.int8
    assert int(qw.q.min()) >= args.q_min and int(qw.q.max()) <= args.q_max
    assert (qw.zero_point is None) == symmetric
    g = args.group_size_for(128)
    assert qw.scale.shape == (16, 128 // g)
    step = qw.scale.repeat_interleave(g, dim=1)
    err = (w - dequantize(qw)).abs()
    # Inside the grid the error is at most half a step; the symmetric grid clips only its top level.
    slack = 1.0 if symmetric else 0.5
    assert torch.all(err <= step * slack + 1e-6)


def test_more_bits_means_less_error():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    errors = [float((w - dequantize(quantize(w, make_scheme(b, 64).weights))).pow(2).mean()) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


def test_all_zero_rows_quantize_to_zero():
    qw = quantize(torch.zeros(4, 64), make_scheme(4, 32, symmetric=False).weights)
    assert torch.equal(dequantize(qw), torch.zeros(4, 64))


def test_group_size_that_does_not_divide_falls_back_to_a_divisor():
    args = make_scheme(4, 128).weights
    assert resolve_group_size(args, 1536).group_size == 128
    assert resolve_group_size(args, 576).group_size == 64
    assert resolve_group_size(args, 100).strategy == "channel"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_bits=5), "5-bit"),
        (dict(group_size=0), "group size"),
        (dict(group_size=-4), "group size"),
        (dict(actorder="group"), "g_idx"),
        (dict(type="mx"), "not supported"),
    ],
)
def test_bad_schemes_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(LowbitError, match=message):
        QuantizationArgs(**kwargs)


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (3, True), (2, False)])
def test_mse_observer_never_does_worse_than_minmax_on_the_row_error(bits, symmetric):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(64, 1)
    errors = {}
    for observer in ("minmax", "mse"):
        qw = quantize(w, make_scheme(bits, 64, symmetric, observer=observer).weights)
        errors[observer] = (dequantize(qw) - w).abs().pow(2.4).reshape(64 * 4, 64).sum(dim=1)
    assert torch.all(errors["mse"] <= errors["minmax"] + 1e-6)
    assert errors["mse"].sum() < errors["minmax"].sum()


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_fp8_grid_stores_e4m3_values_with_the_largest_weight_at_448(strategy):
    from lowbit.schemes import FP8, FP8_DYNAMIC

    w = torch.randn(32, 96) * torch.logspace(-2, 1, 32)[:, None]  # rows of very different ranges
    args = (FP8_DYNAMIC() if strategy == "channel" else FP8()).weights
    qw = quantize(w, args, torch.float32)
    assert qw.q.dtype == torch.float8_e4m3fn and qw.scale.shape == (32, 1)
    peak = qw.q.float().abs().amax(dim=1)
    if strategy == "channel":
        torch.testing.assert_close(peak, torch.full((32,), 448.0))
    else:
        assert torch.equal(qw.scale, qw.scale[:1].expand(32, 1)) and float(peak.max()) == 448.0
    # e4m3 keeps 3 mantissa bits: every normal value within 1/16 of itself
    err = (qw.dequantize(torch.float32) - w).abs()
    normal = qw.q.float().abs() >= 2**-6
    assert bool((err[normal] <= w.abs()[normal] / 16 + 1e-9).all())
