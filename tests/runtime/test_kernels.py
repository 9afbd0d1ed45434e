import pytest
import torch

from lowbit.runtime.kernels import (
    DequantLinear,
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    NativeInt4Linear,
    fast_linear,
    unpack_int4_cpu_layout,
)
from lowbit.runtime.native import q4_kernels
from lowbit.schemes import dequantize, make_scheme, quantize

NATIVE = q4_kernels() is not None


def reference(qw, x):
    return x.float() @ dequantize(qw, torch.float32).t()


@pytest.mark.parametrize(
    "scheme, kind",
    [
        (make_scheme(4, 64), Int4Linear),
        (make_scheme(4, 32, symmetric=False), Int4Linear),
        (make_scheme(4, 128), Int4Linear),
        (make_scheme(8, None), Int8Linear),
        (make_scheme(3, 64), DequantLinear),
        (make_scheme(2, 32, symmetric=False), DequantLinear),
        (make_scheme(4, 96), NativeInt4Linear if NATIVE else DequantLinear),
    ],
)
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_fast_kernels_agree_with_the_dequantized_reference(scheme, kind, rows):
    torch.manual_seed(0)
    qw = quantize(torch.randn(128, 384), scheme.weights)
    layer = fast_linear(qw)
    assert type(layer) is kind
    x = torch.randn(2, rows, 384).to(torch.bfloat16)
    ref = reference(qw, x)
    y = layer(x).float()
    assert y.shape == ref.shape
    assert float((y - ref).abs().max()) <= 0.02 * float(ref.abs().max())


@pytest.mark.parametrize("kind", [Int4Linear, NativeInt4Linear])
@pytest.mark.parametrize("rows", [1, 5, 9])
@pytest.mark.parametrize("shape", [(64, 576), (192, 1536), (128, 640)])
def test_each_int4_kernel_matches_the_reference(kind, rows, shape):
    torch.manual_seed(0)
    qw = quantize(torch.randn(*shape), make_scheme(4, 64, symmetric=False).weights)
    if not kind.supports(qw):
        pytest.skip(f"{kind.__name__} is not available on this machine")
    x = torch.randn(rows, shape[1]).to(torch.bfloat16)
    ref = reference(qw, x)
    assert float((kind(qw)(x).float() - ref).abs().max()) <= 0.02 * float(ref.abs().max())


def test_int4_layout_unpacks_to_the_codes():
    u = torch.randint(0, 16, (192, 96), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    assert torch.equal(unpack_int4_cpu_layout(packed, 192, 96).to(torch.int32), u)


@pytest.mark.parametrize("kind", [Int4Linear, NativeInt4Linear])
def test_int4_stores_half_a_byte_per_weight(kind):
    qw = quantize(torch.randn(256, 512), make_scheme(4, 64).weights)
    if not kind.supports(qw):
        pytest.skip(f"{kind.__name__} is not available on this machine")
    layer = kind(qw)
    assert layer.packed.numel() * layer.packed.element_size() == 256 * 512 // 2


def test_fp8_is_close_to_the_weight():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = torch.randn(4, 128).to(torch.bfloat16)
    y = Fp8Linear(w)(x).float()
    ref = x.float() @ w.t()
    assert float((y - ref).abs().max()) <= 0.1 * float(ref.abs().max())


def test_native_int4_unpacking_matches_the_portable_one():
    from lowbit.runtime.native import decode_step_module

    if decode_step_module() is None:
        pytest.skip("lowbit's native code cannot be built on this machine")
    qw = quantize(torch.randn(192, 320), make_scheme(4, 64, symmetric=False).weights)
    layer = Int4Linear(qw)
    native = layer.dequantized()
    g = layer.group_size
    u = layer.unpacked_codes().float().reshape(192, -1, g)
    s, m = (layer.scale_zero[..., i].t().float().unsqueeze(-1) for i in (0, 1))
    portable = ((u - 8) * s + m).reshape(192, 320)
    torch.testing.assert_close(native.float(), portable, rtol=0.01, atol=1e-6)
    exact = dequantize(qw, torch.float32)  # bf16 scales and offsets: errors up to ~1% of the largest weight
    assert float((native.float() - exact).abs().max()) <= 0.01 * float(exact.abs().max())


@pytest.mark.parametrize("grid_or_method", ["nf", "float", "hqq"])
def test_code_books_and_float_zero_points_run_correctly(grid_or_method):
    from lowbit.algorithms import get_method

    torch.manual_seed(0)
    w = torch.randn(128, 384)
    if grid_or_method == "hqq":
        qw, _ = get_method("hqq").quantize(w, None, make_scheme(4, 64, symmetric=False, actorder=None).weights)
    else:
        qw = quantize(w, make_scheme(4, 64, grid=grid_or_method).weights)
    layer = fast_linear(qw)
    if grid_or_method != "hqq":
        assert type(layer) is DequantLinear  # no packed kernel reads a code book
    for rows in (1, 17):
        x = torch.randn(rows, 384).to(torch.bfloat16)
        ref = reference(qw, x)
        assert float((layer(x).float() - ref).abs().max()) <= 0.02 * float(ref.abs().max())
