"""lowbit's own CPU code (``csrc/``), compiled on first use with the system C++ compiler and cached.

* ``q4gemv.cpp``: a 4-bit GEMV for CPUs with AVX-512 VNNI, for int4 layers torch's kernel does not
  take (all of them with ``LOWBIT_NATIVE=1``).
* ``decode_step.cpp``: a whole decode step of the lean decoder in one call; ``int4_dequant.cpp``:
  torch's int4 layout unpacked to bf16 for prefill GEMMs.

``LOWBIT_NATIVE=0`` never builds either; if a build fails lowbit says so once and uses the Python path.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Optional

from lowbit.data.assets import cache_dir

CSRC = Path(__file__).parent / "csrc"


def cpu_has(*flags: str) -> bool:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((l for l in info.splitlines() if l.startswith("flags")), "")
    have = set(line.split())
    return all(f in have for f in flags)


@functools.lru_cache(maxsize=None)
def _build(stem: str, *more: str) -> Optional[object]:
    """Compile ``csrc/<stem>.cpp`` (and ``csrc/<more>.cpp``) into a cached extension module; None when it cannot be built."""
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        build = cache_dir("extensions", stem)
        build.mkdir(parents=True, exist_ok=True)
        return load(
            name=f"lowbit_{stem}",
            sources=[str(CSRC / f"{name}.cpp") for name in (stem, *more)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers: fall back to the Python path
        warnings.warn(f"lowbit's native {stem} could not be built ({type(exc).__name__}); using the Python path")
        return None


def q4_kernels() -> Optional[object]:
    """The 4-bit GEMV module, or None when this CPU lacks AVX-512 VNNI or the build fails."""
    if not cpu_has("avx512f", "avx512bw", "avx512vl", "avx512_vnni"):
        return None
    return _build("q4gemv")


def decode_step_module() -> Optional[object]:
    """The one-call decode step (and the int4 → bf16 unpacking for prefill), or None when it cannot be built."""
    return _build("decode_step", "int4_dequant")
