"""lowbit's int8 x int8 GEMM (csrc/int8_gemm.cpp) against Python's activation rounding and exact integer sums."""

import pytest
import torch

from lowbit.runtime.cpu import ISA_LEVELS
from lowbit.runtime.kernels import InputQuantLinear, Int8Linear, fast_linear
from lowbit.schemes import W4A8, W8A8, W8A8_STATIC, quantize
from lowbit.schemes.activations import quantize_activation

from .test_kernels import kernels_for

INPUTS = {"token": W8A8().input_activations, "tensor static": W8A8_STATIC().input_activations,
          "tensor dynamic": W8A8_STATIC().input_activations.__class__(num_bits=8, strategy="tensor", dynamic=True,
                                                                      group_size=None)}
STATIC = torch.tensor([0.05])


def _call(module, x, panels, scale, how):
    args = INPUTS[how]
    static = float(STATIC) if not args.dynamic else 0.0
    return module.int8_gemm(x, panels, scale, x.shape[1], args.strategy == "tensor", static)


def _reference(x, q, scale, how):
    """s_x s_w Σ q_x q_w in float64, q_x as lowbit.schemes.activations rounds it."""
    args = INPUTS[how]
    qx, sx = quantize_activation(x, args, None if args.dynamic else STATIC)
    return (qx.double() @ q.double().t()) * sx.double() * scale.double()[None]


@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize("how", list(INPUTS))
def test_inputs_round_exactly_as_python_does(isa, how):
    module = kernels_for(isa)
    x = torch.randn(9, 130) * torch.linspace(0.1, 9, 130)
    args = INPUTS[how]
    q, s = module.int8_quantize_rows(x, args.strategy == "tensor", 0.0 if args.dynamic else float(STATIC))
    ref_q, ref_s = quantize_activation(x, args, None if args.dynamic else STATIC)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s.expand(9, 1))


@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 77])  # decode (u8 x s8) and prefill (int16 without VNNI) paths
@pytest.mark.parametrize("how", list(INPUTS))
def test_each_isa_sums_exactly(isa, rows, how):
    """130 columns (not a multiple of 4) and 37 outputs (a lone panel, part-filled): padding must not leak."""
    module = kernels_for(isa)
    g = torch.Generator().manual_seed(rows)
    q = torch.randint(-128, 128, (37, 130), dtype=torch.int8, generator=g)
    q[0, :] = -128  # the most negative weight: |w| = 128 still multiplies exactly
    scale = torch.rand(37, generator=g) + 0.01
    x = torch.randn(rows, 130, generator=g) * 3
    y = _call(module, x, module.int8_pack(q), scale, how)
    ref = _reference(x, q, scale, how)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


def test_avx2_and_avx512_compute_the_same_outputs():
    a, b = kernels_for("avx2"), kernels_for("avx512")
    q = torch.randint(-128, 128, (64, 256), dtype=torch.int8)
    scale, x = torch.rand(64), torch.randn(20, 256)
    assert torch.equal(_call(a, x, a.int8_pack(q), scale, "token"), _call(b, x, b.int8_pack(q), scale, "token"))


def test_w8a8_layers_take_the_int8_kernel_and_other_schemes_say_why():
    w = torch.randn(48, 128)
    for scheme, kind, reason in [(W8A8(), Int8Linear, None), (W4A8(group_size=64), InputQuantLinear, "int4 sym g64")]:
        layer = fast_linear(quantize(w, scheme.weights), inputs=(scheme.input_activations, None))
        assert isinstance(layer, kind)
        assert (reason is None and layer.fallback is None) or reason in layer.fallback
    x = torch.randn(5, 128)
    qw = quantize(w, W8A8().weights)
    layer = fast_linear(qw, inputs=(W8A8().input_activations, None), dtype=torch.float32)
    qx, sx = quantize_activation(x, W8A8().input_activations)
    expected = (qx.double() * sx.double()) @ qw.dequantize(torch.float64).t()
    torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_without_kernels_w8a8_falls_back_and_says_why(monkeypatch):
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    layer = fast_linear(quantize(torch.randn(16, 64), W8A8().weights), inputs=(W8A8().input_activations, None))
    assert isinstance(layer, InputQuantLinear) and "LOWBIT_NATIVE=0" in layer.fallback
