"""Write an output folder so that it either appears complete or not at all."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lowbit.errors import LowbitError


def check_output_dir(final: Path, overwrite: bool) -> None:
    """Fail early (before any work) if ``final`` exists and may not be replaced."""
    if final.exists() and not overwrite:
        raise LowbitError(f"output folder {final} already exists; pass --overwrite to replace it")
    if final.exists() and not final.is_dir():
        raise LowbitError(f"output path {final} exists and is not a folder")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output_dir(final: Path, overwrite: bool = False):
    """Yield a staging folder next to ``final``; rename it into place only if the block succeeds.

    On any failure (a full disk included) the staging folder is removed and an existing
    ``final`` is left untouched; on success an old ``final`` is replaced only after the new
    one is complete.
    """
    final = Path(final)
    check_output_dir(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    try:
        yield staging
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise LowbitError(f"disk full while writing {final}; nothing was written there") from None
        raise LowbitError(f"could not write {final}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        final.rename(old / final.name)
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
