import pytest
import torch

from lowbit.runtime.cpu import ISA_LEVELS, cpu
from lowbit.runtime.kernels import DenseLinear, Fp8Linear, PackedLinear, fast_linear, fallback_notice
from lowbit.runtime.layout import DECODE_ROWS, Kind, dequantize_packed, pack, quantize_activations
from lowbit.runtime.native import native_module
from lowbit.schemes import FP8_DYNAMIC, dequantize, make_scheme, quantize

ISA_REQUIREMENT = {"avx512": "AVX-512 F/BW/VL/DQ/CD and AVX-512 VNNI", "avx2": "AVX2, FMA and F16C"}


def kernels_for(isa: str):
    """The compiled kernels of one ISA level, or a skip saying why this machine cannot run them."""
    if isa != "generic" and cpu().native_isa != isa and ISA_LEVELS.index(cpu().native_isa) < ISA_LEVELS.index(isa):
        pytest.skip(f"this CPU lacks {ISA_REQUIREMENT[isa]}")
    if isa != "generic" and cpu().machine != "x86_64":
        pytest.skip("x86 kernels on a non-x86 CPU")
    module = native_module(isa)
    if module is None:
        pytest.skip("lowbit's kernels cannot be built here (no C++ compiler)")
    return module


SCHEMES = [
    make_scheme(4, 64), make_scheme(4, 32, symmetric=False), make_scheme(4, 128), make_scheme(8, None),
    make_scheme(8, 64, symmetric=False), make_scheme(3, 64), make_scheme(3, 128, symmetric=False),
    make_scheme(2, 32, symmetric=False), make_scheme(2, 64),
]


@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.weights.describe())
def test_each_isa_dequantizes_exactly_as_the_reference_layout(isa, scheme):
    module = kernels_for(isa)
    torch.manual_seed(0)
    qw = quantize(torch.randn(96, 384), scheme.weights)
    pw = pack(qw)
    ref = dequantize_packed(pw)
    out = module.dequantize(pw.packed, pw.scale, pw.offset, pw.bits, pw.group_size, 384, torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    exact = dequantize(qw, torch.float32)  # float16 scales and offsets: within 0.1% of the largest weight
    assert float((ref - exact).abs().max()) <= 1e-3 * float(exact.abs().max())


def assert_gemv_exact(module, w: torch.Tensor, scheme, rows: int):
    """The kernel's y against x̂ Wᵀ (x̂ the activations as the kernel rounds them): float32 summation only."""
    torch.manual_seed(0)
    pw = pack(quantize(w, scheme.weights))
    x = torch.randn(rows, w.shape[1])
    ref = quantize_activations(x) @ dequantize_packed(pw).t()
    y = module.gemv(x, pw.packed, pw.scale, pw.offset, pw.bits, pw.group_size)
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-5 * float(ref.abs().max()))
    # and the rounding of the activations itself (as llama.cpp's Q8 blocks) costs little
    assert float((y - x @ dequantize_packed(pw).t()).abs().max() / ref.abs().max()) <= 0.012


@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.weights.describe())
@pytest.mark.parametrize("rows", [1, 3, DECODE_ROWS, 2 * DECODE_ROWS + 3])
def test_each_isa_gemv_matches_the_reference(isa, scheme, rows):
    """One row (the decode step), and batches: below and above the row-templated kernels' DECODE_ROWS, and, for
    AVX2's panels of four activation rows, whole panels with a tail."""
    module = kernels_for(isa)
    assert_gemv_exact(module, torch.randn(70, 640), scheme, rows)  # 70 rows: tiles of 4 plus a tail


@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize("scheme", [make_scheme(4, 32), make_scheme(3, 32, symmetric=False), make_scheme(8, None)],
                         ids=lambda s: s.weights.describe())
@pytest.mark.parametrize("rows", [1, 5])
def test_an_odd_number_of_blocks_takes_the_one_block_kernel_and_agrees(isa, scheme, rows):
    """672 columns are 21 blocks: no whole pairs (one block per step, for one row and for a batch's panels), and a
    per-channel group of 21 blocks."""
    assert_gemv_exact(kernels_for(isa), torch.randn(37, 672), scheme, rows)


def test_avx2_and_avx512_compute_the_same_integers():
    """Both levels quantize activations identically; only float summation order may differ."""
    a, b = kernels_for("avx2"), kernels_for("avx512")
    qw = quantize(torch.randn(128, 640, generator=torch.Generator().manual_seed(1)), make_scheme(4, 64).weights)
    pw = pack(qw)
    x = torch.randn(2, 640, generator=torch.Generator().manual_seed(2))
    ya, yb = (m.gemv(x, pw.packed, pw.scale, pw.offset, 4, 64) for m in (a, b))
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5 * float(ya.abs().max()))


def test_the_build_shares_pythons_constants():
    module = kernels_for("generic")
    assert (module.BLOCK, module.DECODE_ROWS) == (32, DECODE_ROWS)
    assert (module.KIND_DENSE, module.KIND_PACKED, module.KIND_CALLBACK, module.KIND_INT8) == tuple(int(k) for k in Kind)


@pytest.mark.parametrize("scheme", SCHEMES[:4] + SCHEMES[5:6], ids=lambda s: s.weights.describe())
@pytest.mark.parametrize("rows", [1, 17])
def test_every_default_scheme_runs_packed_and_agrees_with_the_reference(scheme, rows):
    if native_module() is None:
        pytest.skip("lowbit's kernels cannot be built here")
    torch.manual_seed(0)
    qw = quantize(torch.randn(128, 384), scheme.weights)
    layer = fast_linear(qw)
    assert type(layer) is PackedLinear and layer.fallback is None
    x = torch.randn(2, rows, 384)
    ref = x @ dequantize(qw, torch.float32).t()
    y = layer(x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    tol = 0.012 if rows <= DECODE_ROWS else (0.01 if layer.dtype == torch.bfloat16 else 1e-3)
    assert float((y - ref).abs().max()) <= tol * float(ref.abs().max())


def test_packed_4bit_stores_half_a_byte_per_weight_plus_fp16_scales():
    if native_module() is None:
        pytest.skip("lowbit's kernels cannot be built here")
    layer = fast_linear(quantize(torch.randn(256, 512), make_scheme(4, 64).weights))
    assert layer.packed.numel() == 256 * 512 // 2
    assert layer.scale.dtype == torch.float16 and layer.scale.shape == (256, 8)
    assert layer.offset is None  # symmetric: the zero code is implicit, no offset is stored or read
    asym = fast_linear(quantize(torch.randn(256, 512), make_scheme(4, 64, symmetric=False).weights))
    assert asym.offset.dtype == torch.float16 and asym.offset.shape == (256, 8)


@pytest.mark.parametrize("grid_or_method", ["nf", "float", "hqq"])
def test_code_books_are_announced_and_float_zero_points_run_packed(grid_or_method):
    from lowbit.algorithms import get_method

    if native_module() is None:
        pytest.skip("lowbit's kernels cannot be built here")
    torch.manual_seed(0)
    w = torch.randn(128, 384)
    if grid_or_method == "hqq":
        qw, _ = get_method("hqq").quantize(w, None, make_scheme(4, 64, symmetric=False, actorder=None).weights)
    else:
        qw = quantize(w, make_scheme(4, 64, grid=grid_or_method).weights)
    layer = fast_linear(qw)
    if grid_or_method == "hqq":
        assert type(layer) is PackedLinear
    else:
        assert type(layer) is DenseLinear and "code book" in layer.fallback
        notice = fallback_notice([("model.layers.0.mlp.down_proj", layer)])
        assert "model.layers.0.mlp.down_proj" in notice and "code book" in notice and "MB" in notice
    for rows in (1, 17):
        x = torch.randn(rows, 384)
        ref = x @ dequantize(qw, torch.float32).t()
        assert float((layer(x) - ref).abs().max()) <= 0.012 * float(ref.abs().max())


def test_without_kernels_layers_are_dense_and_say_why(monkeypatch):
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    layer = fast_linear(quantize(torch.randn(64, 128), make_scheme(4, 32).weights))
    assert type(layer) is DenseLinear and layer.fallback == "LOWBIT_NATIVE=0"
    assert fallback_notice([("a", layer)]).startswith("lowbit: a off the packed kernels (LOWBIT_NATIVE=0)")


def test_fp8_weights_run_upcast_and_say_it_is_for_accuracy():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = torch.randn(4, 128)
    qw = quantize(w, FP8_DYNAMIC().weights, torch.float32)
    layer = fast_linear(qw, dtype=torch.float32)
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    assert "no FP8 arithmetic on CPU" in layer.fallback
    torch.testing.assert_close(layer(x), x @ qw.dequantize(torch.float32).t(), rtol=1e-5, atol=1e-5)


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, capsys):
    import os
    import time

    from lowbit.runtime.native import STALE_LOCK_S, clear_stale_lock

    lock = tmp_path / "lock"
    lock.touch()
    clear_stale_lock(lock)
    assert lock.exists() and "waiting for another process's build" in capsys.readouterr().err  # one may be running
    old = time.time() - STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    clear_stale_lock(lock)
    assert not lock.exists() and "interrupted build" in capsys.readouterr().err
