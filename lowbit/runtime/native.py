"""lowbit's own CPU code (``csrc/``), compiled on first use with the system C++ compiler and cached.

One extension per kernel ISA level (:mod:`lowbit.runtime.cpu`), built from the same sources:
``qgemv.cpp`` (packed 2/3/4/8-bit GEMV and dequantization), ``int8_gemm.cpp`` (int8 × int8 GEMM of
W8A8 layers) and ``decode_step.cpp`` (a whole decode step of the lean decoder in one call). The shared constants come from :mod:`lowbit.runtime.layout`.

``LOWBIT_NATIVE=0`` never builds it; if a build fails lowbit says so once, with the cost, and
runs the PyTorch path.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

from lowbit.data.assets import cache_dir
from lowbit.runtime.cpu import ISA_CFLAGS, cpu, selected_isa
from lowbit.runtime.layout import compile_definitions

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("qgemv.cpp", "int8_gemm.cpp", "decode_step.cpp")
_failures: dict[str, str] = {}
STALE_LOCK_S = 15 * 60  # a build takes about 2 minutes on 2 cores; a lock this old was left by a killed one


def build_failure(isa: str) -> Optional[str]:
    """Why the extension for ``isa`` could not be built (None if it was, or was not tried)."""
    return _failures.get(isa)


def disabled() -> bool:
    return os.environ.get("LOWBIT_NATIVE", "1") == "0"


@functools.lru_cache(maxsize=None)
def native_module(isa: Optional[str] = None) -> Optional[object]:
    """The compiled kernels for ``isa`` (default: the selected level), or None when they cannot be built."""
    isa = isa or selected_isa()
    if disabled():
        return None
    if isa != "generic" and cpu().machine != "x86_64":
        return None
    try:
        from torch.utils.cpp_extension import load

        build = cache_dir("extensions", f"native-{isa}")
        build.mkdir(parents=True, exist_ok=True)
        clear_stale_lock(build / "lock")
        return load(
            name=f"lowbit_native_{isa}",
            sources=[str(CSRC / name) for name in SOURCES],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3", "-fopenmp", *ISA_CFLAGS[isa], *compile_definitions()],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers: the PyTorch path
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        _failures[isa] = f"{type(exc).__name__}: {reason[:200]}"
        print(f"lowbit: could not build its {isa} kernels ({_failures[isa]}); quantized layers are held"
              " dequantized and decode runs the PyTorch loop (several times slower)", file=sys.stderr)
        return None


def clear_stale_lock(lock: Path) -> None:
    """Remove a build lock older than ``STALE_LOCK_S``: torch waits on it forever once the build holding it was
    killed (Ctrl-C during the first build), which would leave every later run hanging without a word. A younger
    lock is waited on, saying so."""
    import time

    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        lock.unlink(missing_ok=True)
        print(f"lowbit: removed a build lock {age / 60:.0f} minutes old ({lock}), left by an interrupted build",
              file=sys.stderr)
    else:
        print(f"lowbit: waiting for another process's build of the kernels ({lock}, {age:.0f} s old; a lock left"
              f" by an interrupted build is removed once it is {STALE_LOCK_S // 60} minutes old)", file=sys.stderr)
