"""lowbit's own CPU kernels (``csrc/``), compiled on first use with the system C++ compiler and cached.

Used where the CPU has AVX-512 VNNI for int4 layers torch's kernel does not take (all of them with
``LOWBIT_NATIVE=1``; ``LOWBIT_NATIVE=0`` never builds it); if the build fails lowbit says so once
and uses the portable path.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Optional

from lowbit.data.assets import cache_dir

SOURCE = Path(__file__).parent / "csrc" / "q4gemv.cpp"


def cpu_has(*flags: str) -> bool:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((l for l in info.splitlines() if l.startswith("flags")), "")
    have = set(line.split())
    return all(f in have for f in flags)


@functools.lru_cache(maxsize=1)
def q4_kernels() -> Optional[object]:
    """The compiled extension module, or None when this machine cannot build or run it."""
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        return None
    if not cpu_has("avx512f", "avx512bw", "avx512vl", "avx512_vnni"):
        return None
    try:
        from torch.utils.cpp_extension import load

        build = cache_dir("extensions", "q4gemv")
        build.mkdir(parents=True, exist_ok=True)
        return load(
            name="lowbit_q4gemv",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers: fall back to torch's kernels
        warnings.warn(f"lowbit's native 4-bit kernel could not be built ({type(exc).__name__}); using torch's")
        return None
