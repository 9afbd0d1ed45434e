"""llama.cpp's grids as lowbit fits them: more bits cost less error, a zero block stays zero, and the importance
of a column buys it precision (what GPTQ's Hessian diagonal and llama.cpp's importance matrix are for)."""

import pytest
import torch

from lowbit.schemes import ggml


def _relative_error(kind, w, importance=None):
    got = ggml.quantize(w, kind, importance).dequantize()
    return float(((got - w) ** 2).sum() / (w**2).sum())


def test_more_bits_cost_less_error_in_both_families():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    k = [_relative_error(ggml.TYPES[n], w) for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")]
    flat = [_relative_error(ggml.TYPES[n], w) for n in ("Q4_0", "Q5_0", "Q8_0")]
    assert k == sorted(k, reverse=True) and flat == sorted(flat, reverse=True)
    assert k[2] < 0.0065 and k[4] < 0.0005  # Gaussian rows: Q4_K ≈ 0.0055 of the energy, Q6_K ≈ 0.0003


@pytest.mark.parametrize("name", list(ggml.TYPES))
def test_a_zero_block_stays_exactly_zero_and_nothing_is_nan(name):
    w = torch.randn(4, 512, generator=torch.Generator().manual_seed(1))
    w[:, :256] = 0
    got = ggml.quantize(w, ggml.TYPES[name]).dequantize()
    assert torch.isfinite(got).all() and torch.equal(got[:, :256], torch.zeros(4, 256))


def test_important_columns_are_fitted_more_closely():
    kind = ggml.TYPES["Q4_K"]
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    importance = torch.ones(256)
    importance[::8] = 100.0
    plain = ggml.quantize(w, kind).dequantize()
    weighted = ggml.quantize(w, kind, importance).dequantize()
    err = lambda got: float(((got - w)[:, ::8] ** 2).sum())  # noqa: E731
    assert err(weighted) < 0.8 * err(plain)


def test_a_k_quant_needs_whole_super_blocks():
    with pytest.raises(ValueError, match="Q4_K needs rows of a multiple of 256 weights, not 576"):
        ggml.quantize(torch.zeros(2, 576), ggml.TYPES["Q4_K"])
