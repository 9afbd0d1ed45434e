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


def test_an_output_under_a_file_is_refused_before_any_work(tmp_path):
    from lowbit.formats.checkpoint import check_output_dir

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LowbitError, match="notes.txt is a file"):
        check_output_dir(tmp_path / "notes.txt" / "deeper" / "out", overwrite=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_unwritable_output_parent_is_refused_before_any_work(tmp_path):
    import os

    from lowbit.formats.checkpoint import check_output_dir

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(LowbitError, match="not writable"):
            check_output_dir(locked / "out", overwrite=False)
    finally:
        locked.chmod(0o700)


def test_every_file_written_gets_ordinary_permissions(tmp_path):
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    out = tmp_path / "out"
    with atomic_output_dir(out) as staging:
        save_file({"w": torch.zeros(2)}, str(staging / "model.safetensors"))
        (staging / "config.json").write_text("{}")
    mask = os.umask(0)
    os.umask(mask)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        "model.safetensors": 0o666 & ~mask, "config.json": 0o666 & ~mask}


def test_sigterm_during_a_save_leaves_no_half_written_folder(tmp_path):
    import signal
    import subprocess
    import sys

    script = (
        "import os, signal, sys; from pathlib import Path; from lowbit.formats.checkpoint import atomic_output_dir\n"
        "with atomic_output_dir(Path(sys.argv[1])) as staging:\n"
        "    (staging / 'half.bin').write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    (staging / 'never.txt').write_text('unreachable')\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert list(tmp_path.iterdir()) == []
