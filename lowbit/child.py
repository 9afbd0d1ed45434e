"""Run a ``lowbit`` command in a fresh interpreter and read its ``--json`` result back: what ``eval`` of
several models and ``study`` do, so that every model's peak memory is its own."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import IO, Optional


def run_lowbit(args: list[str], stderr: Optional[IO[str]] = None) -> tuple[int, Optional[object]]:
    """``lowbit ARGS`` (which must ask for ``--json``) in its own process: (exit status, parsed JSON, or
    None when it failed). Its stderr goes to ``stderr`` (default: this process's)."""
    done = subprocess.run([sys.executable, "-m", "lowbit.cli.main", *args], stdout=subprocess.PIPE,
                          stderr=stderr, text=True)
    return done.returncode, json.loads(done.stdout) if done.returncode == 0 else None
