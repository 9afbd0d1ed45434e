"""Read one file out of a Debian .deb (an ar archive holding data.tar.*) without dpkg."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from lowbit.errors import LowbitError


def _ar_members(blob: bytes):
    if not blob.startswith(b"!<arch>\n"):
        raise LowbitError("not a Debian package (bad ar header)")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        yield name, blob[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)


def extract_member(deb: Path, suffix: str) -> bytes:
    """Bytes of the file in the package's data archive whose path ends with ``suffix``."""
    for name, data in _ar_members(deb.read_bytes()):
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar.getmembers():
                    if member.isfile() and member.name.endswith(suffix):
                        return tar.extractfile(member).read()
    raise LowbitError(f"{deb.name} has no file ending in {suffix}")
