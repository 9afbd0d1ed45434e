import errno

import pytest

from lowbit.errors import LowbitError
from lowbit.formats.checkpoint import atomic_output_dir


def test_existing_output_is_never_overwritten_without_permission(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(LowbitError, match="--overwrite"):
        with atomic_output_dir(out):
            pass
    assert (out / "precious.txt").read_text() == "keep me"


def test_a_failed_write_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(LowbitError, match="disk full"):
        with atomic_output_dir(out, overwrite=True) as staging:
            (staging / "config.json").write_text("{}")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "old.txt").read_text() == "old"


def test_a_successful_overwrite_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_output_folder_gets_ordinary_permissions(tmp_path):
    import os
    import stat

    out = tmp_path / "out"
    with atomic_output_dir(out) as staging:
        (staging / "f").write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
