"""Write an output folder or file so that it either appears complete or not at all."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from lowbit.data.assets import umask
from lowbit.errors import LowbitError


def check_output_dir(final: Path, overwrite: bool) -> None:
    """Fail early (before any work) if ``final`` exists and may not be replaced, or cannot be written.

    The nearest existing folder on the way to ``final`` must be a folder that takes a new entry (tried, not
    guessed from permission bits: read-only file systems and root both make those lie).
    """
    if final.exists() and not overwrite:
        raise LowbitError(f"output folder {final} already exists; pass --overwrite to replace it")
    if final.exists() and not final.is_dir():
        raise LowbitError(f"output path {final} exists and is not a folder")
    ancestor = final.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LowbitError(f"cannot write {final}: {ancestor} is a file, not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=f".{final.name}.probe-", dir=ancestor)).rmdir()
    except OSError as exc:
        raise LowbitError(f"cannot write {final}: {ancestor} is not writable ({exc.strerror or exc})") from None


@contextmanager
def _terminate_as_exception():
    """Within the block, SIGTERM raises SystemExit, so that the staging folder is removed (by default it
    ends the process on the spot and leaves a hidden half-written folder behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    os.chmod(staging, 0o777 & ~umask())  # mkdtemp makes it private; the result should not be
    try:
        with _terminate_as_exception():
            yield staging
        for file in staging.rglob("*"):  # some writers (safetensors) create their files 0600
            if file.is_file():
                os.chmod(file, 0o666 & ~umask())
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


def check_output_file(final: Path, overwrite: bool) -> None:
    """Fail early (before any work) if the file ``final`` exists and may not be replaced, or cannot be written."""
    if final.exists() and not overwrite:
        raise LowbitError(f"output file {final} already exists; pass --overwrite to replace it")
    if final.is_dir():
        raise LowbitError(f"output path {final} is a folder, not a file")
    check_output_dir(final.parent, overwrite=True)  # its folder: a folder (or to be made) that takes a new entry


@contextmanager
def atomic_output_file(final: Path, overwrite: bool = False):
    """Yield a staging path next to ``final``; rename it into place only if the block succeeds (an existing
    ``final`` is left untouched on any failure, a full disk included)."""
    final = Path(final)
    check_output_file(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.partial-", dir=final.parent)
    os.close(fd)
    staging = Path(name)
    try:
        with _terminate_as_exception():
            yield staging
        os.chmod(staging, 0o666 & ~umask())
    except OSError as exc:
        staging.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise LowbitError(f"disk full while writing {final}; nothing was written there") from None
        raise LowbitError(f"could not write {final}: {exc.strerror or exc}") from None
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    staging.replace(final)
