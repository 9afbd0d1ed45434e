import json
import os
import subprocess
import sys

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.runtime.cpu import TORCH_SWITCHES, CpuInfo, compute_dtype, forced_isa, selected_isa

ZEN3 = CpuInfo("x86_64", "AMD EPYC (Zen 3)", frozenset("fma avx avx2 f16c sse4_2".split()))
ZEN4 = CpuInfo("x86_64", "AMD EPYC (Zen 4)", frozenset(
    "fma avx2 f16c avx512f avx512bw avx512vl avx512dq avx512cd avx512_vnni avx512_bf16".split()))
GRAVITON = CpuInfo("aarch64", "Neoverse", frozenset("asimd asimddp i8mm bf16".split()))


def test_kernel_level_follows_the_cpu_flags():
    assert ZEN3.native_isa == "avx2" and not ZEN3.bf16_arithmetic
    assert ZEN4.native_isa == "avx512" and ZEN4.bf16_arithmetic
    assert GRAVITON.native_isa == "generic" and GRAVITON.features()["dotprod"]
    assert CpuInfo("x86_64", "old", frozenset({"sse4_2"})).native_isa == "generic"


def test_forcing_a_lower_level_also_drops_bf16(monkeypatch):
    monkeypatch.setenv("LOWBIT_ISA", "avx2")
    assert forced_isa() == "avx2" and compute_dtype() == torch.float32
    assert selected_isa() in ("avx2", "generic")
    monkeypatch.setenv("LOWBIT_ISA", "avx9000")
    with pytest.raises(LowbitError, match="LOWBIT_ISA='avx9000' is not a kernel level"):
        forced_isa()


def _env_json(**env) -> dict:
    """``lowbit env --json`` in a fresh process, without the torch switches this process may have set."""
    switches = {name for level in TORCH_SWITCHES.values() for name in level}
    inherited = {k: v for k, v in os.environ.items() if k not in switches}
    done = subprocess.run([sys.executable, "-m", "lowbit.cli.main", "env", "--json"], capture_output=True, text=True,
                          env={**inherited, **env}, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_lowbit_isa_avx2_switches_torch_to_its_avx2_kernels_too():
    """The forced path is the one an AVX2-only machine takes: torch's dispatch included, kernels built."""
    report = _env_json(LOWBIT_ISA="avx2")
    if report["native_isa"] == "generic":
        pytest.skip("this CPU has no AVX2")
    assert report["kernel_isa"] == "avx2" and report["compute_dtype"] == "float32"
    assert report["torch_cpu_capability"] == "AVX2"
    assert report["lowbit kernels"] == "built"


def test_an_unknown_level_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, "-m", "lowbit.cli.main", "env"], capture_output=True, text=True,
                          env={**os.environ, "LOWBIT_ISA": "sse9"}, timeout=600)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: LOWBIT_ISA='sse9' is not a kernel level; choose native, avx512, avx2, generic"]
