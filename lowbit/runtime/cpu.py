"""What this CPU computes natively, and the choices that follow: kernel ISA level and compute dtype.

lowbit's kernels come in three ISA levels, each the same source compiled for it:

* ``avx512``: x86-64-v4 (AVX-512 F/BW/VL/DQ/CD) plus AVX-512 VNNI (Zen 4, Ice Lake and later Xeons).
* ``avx2``: x86-64-v3 (AVX2, FMA, F16C; Haswell, Zen 1–3).
* ``generic``: plain C++ for any CPU (aarch64, older x86): correct, auto-vectorised only.

``LOWBIT_ISA=avx2`` (or ``generic``) forces a lower level on a newer CPU, so the lower path's
numerics can be tested anywhere. Forcing also sets torch's and its libraries' own switches
(:data:`TORCH_SWITCHES`), which they read on first use: torch's kernels then run as on an AVX2
machine (bf16 GEMMs included, ~7x slower than fp32 there, so the compute dtype becomes float32).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError

ISA_ENV = "LOWBIT_ISA"
ISA_LEVELS = ("generic", "avx2", "avx512")  # lowest first

# The flags each level needs (as /proc/cpuinfo spells them) and the compiler flags that build it.
ISA_REQUIRES = {
    "generic": (),
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni"),
}
ISA_CFLAGS = {"generic": [], "avx2": ["-march=x86-64-v3"], "avx512": ["-march=x86-64-v4", "-mavx512vnni"]}

# What torch, oneDNN and MKL are told when a level is forced (set before their first use).
TORCH_SWITCHES = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "generic": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}

# Named features shown by ``lowbit env``: label → the /proc/cpuinfo flag (x86, then aarch64).
FEATURES = {
    "x86_64": {
        "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "AVX-512F": "avx512f", "AVX-512BW": "avx512bw",
        "AVX-512VL": "avx512vl", "AVX-512 VNNI": "avx512_vnni", "AVX-VNNI": "avx_vnni",
        "AVX512_BF16": "avx512_bf16", "AMX-BF16": "amx_bf16", "AMX-INT8": "amx_int8",
    },
    "aarch64": {"NEON": "asimd", "dotprod": "asimddp", "i8mm": "i8mm", "BF16": "bf16", "SVE": "sve"},
}


@dataclass(frozen=True)
class CpuInfo:
    machine: str
    model: str
    flags: frozenset

    def has(self, *flags: str) -> bool:
        return all(f in self.flags for f in flags)

    def features(self) -> dict[str, bool]:
        return {label: flag in self.flags for label, flag in FEATURES.get(self.machine, {}).items()}

    @property
    def native_isa(self) -> str:
        """The highest kernel level this CPU runs."""
        if self.machine != "x86_64":
            return "generic"
        return next(level for level in reversed(ISA_LEVELS) if self.has(*ISA_REQUIRES[level]))

    @property
    def bf16_arithmetic(self) -> bool:
        """Whether bf16 GEMMs run natively (AVX512_BF16 / AMX on x86, the BF16 extension on aarch64)."""
        return self.has("avx512_bf16") or self.has("amx_bf16") or (self.machine == "aarch64" and self.has("bf16"))


@functools.lru_cache(maxsize=1)
def cpu() -> CpuInfo:
    """This machine's CPU, from /proc/cpuinfo (flags of the first core)."""
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or fields.get("Model") or platform.processor() or machine
    flags = (fields.get("flags") or fields.get("Features") or "").split()
    return CpuInfo(machine, model, frozenset(flags))


def forced_isa() -> str | None:
    """The level asked for with ``LOWBIT_ISA`` (None: the native one)."""
    value = os.environ.get(ISA_ENV, "").strip().lower()
    if value in ("", "native"):
        return None
    if value not in ISA_LEVELS:
        raise LowbitError(f"{ISA_ENV}={value!r} is not a kernel level; choose native, {', '.join(reversed(ISA_LEVELS))}")
    return value


def selected_isa() -> str:
    """The level lowbit's kernels run at: the native one, or the forced one where that is lower."""
    native = cpu().native_isa
    forced = forced_isa()
    if forced is None:
        return native
    return min(native, forced, key=ISA_LEVELS.index)


def compute_dtype():
    """bfloat16 where the CPU has bf16 arithmetic and nothing forces a lower level, float32 otherwise."""
    import torch

    forced = forced_isa()
    if forced is not None and forced != "avx512":
        return torch.float32
    return torch.bfloat16 if cpu().bf16_arithmetic else torch.float32


def apply_torch_switches() -> None:
    """Tell torch, oneDNN and MKL about a forced level (before their first use; explicit settings win).

    Runs when lowbit is imported; an unknown value is reported later, by :func:`forced_isa`.
    """
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    for name, value in TORCH_SWITCHES.get(forced, {}).items():
        os.environ.setdefault(name, value)


def describe() -> dict:
    """What was detected and chosen, for ``lowbit env`` and benchmark output."""
    import torch

    info = cpu()
    return {
        "cpu": info.model,
        "machine": info.machine,
        "features": info.features(),
        "native_isa": info.native_isa,
        "forced_isa": forced_isa(),
        "kernel_isa": selected_isa(),
        "compute_dtype": str(compute_dtype()).removeprefix("torch."),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
