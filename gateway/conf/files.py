"""Files and directories that hold secrets or tenant data, created private to their owner.

The data directory (SQLite database, usage journal and spool, embedded broker queue) is
created 0700, the SQLite database and ``.env`` 0600: upstream credentials are encrypted
with a key in ``.env``, and usage records are tenant data. Modes are given when a path is
created and never loosened; a path that already exists keeps its mode (an operator may have
chosen it), and ``gateway.W001`` (gateway/conf/checks.py) reports one that others can read.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

PRIVATE_DIRECTORY = 0o700
PRIVATE_FILE = 0o600


def private_directory(path: Path) -> Path:
    """Create ``path`` (and missing parents) 0700 unless it exists; returns ``path``."""
    path.mkdir(mode=PRIVATE_DIRECTORY, parents=True, exist_ok=True)
    return path


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (SQLite then fills an empty file).

    A missing parent directory is left to whoever opens the file to report.
    """
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE))


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to a new file ``path`` with mode 0600; an existing file is an error.

    Written to ``path.tmp`` first and renamed, so a crash never leaves half a file behind.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)  # a left-over tmp file may have had another mode
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    if path.exists():
        tmp.unlink()
        raise FileExistsError(f"{path} exists; remove it first to write new keys")
    os.replace(tmp, path)


def readable_by_others(path: Path) -> bool:
    """Whether ``path`` exists with any group or other permission bit set."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return bool(stat.S_IMODE(mode) & 0o077)
