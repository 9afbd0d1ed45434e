import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.schemes import dequantize, make_scheme, quantize
from lowbit.schemes.args import QuantizationArgs
from lowbit.schemes.codebooks import FP4_E2M1_LEVELS, NF4_LEVELS, decode, levels, nearest_code


def test_nf4_levels_are_qlora_normal_float():
    nf4 = torch.tensor(NF4_LEVELS)
    assert len(nf4) == 16 and torch.all(nf4[1:] > nf4[:-1])
    assert nf4[0] == -1 and nf4[-1] == 1 and 0.0 in NF4_LEVELS
    # more positive levels than negative ones (8 vs 7), denser near zero
    assert int((nf4 > 0).sum()) == 8 and int((nf4 < 0).sum()) == 7
    assert nf4[8] - nf4[7] < nf4[-1] - nf4[-2]


def test_fp4_codes_are_e2m1_bit_patterns():
    book = levels("float")
    # sign bit 3, exponent bits 2..1, mantissa bit 0: 0b0111 = 1.5 · 2^2 = 6, 0b0011 = 1.5 · 2^0, 0b1010 = −2
    for bits, value in [(0b0111, 6.0), (0b0011, 1.5), (0b1010, -1.0), (0b0001, 0.5), (0b1110, -4.0)]:
        assert float(decode(torch.tensor([bits - 8]), book)) == value
    assert sorted(abs(v) for v in FP4_E2M1_LEVELS[:8]) == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.mark.parametrize("grid", ["nf", "float"])
def test_nearest_code_picks_the_closest_level(grid):
    book = levels(grid)
    x = torch.linspace(-7, 7, 1001) * float(book.abs().max()) / 7
    picked = decode(nearest_code(x, book), book)
    best = (x[:, None] - book[None, :]).abs().min(dim=1).values
    torch.testing.assert_close((x - picked).abs(), best)


def test_nf4_fits_normal_weights_better_than_int4():
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    err = {}
    for grid in ("int", "nf"):
        qw = quantize(w, make_scheme(4, 64, grid=grid, observer="minmax").weights)
        err[grid] = float(((dequantize(qw, torch.float32) - w) ** 2).mean())
        assert qw.q.min() >= -8 and qw.q.max() <= 7
    assert err["nf"] < 0.9 * err["int"]


@pytest.mark.parametrize("kwargs", [dict(type="nf", num_bits=3), dict(type="float", symmetric=False), dict(type="e5m2")])
def test_code_books_are_4_bit_symmetric_only(kwargs):
    with pytest.raises(LowbitError):
        QuantizationArgs(**kwargs)
