"""Secrets and tenant data on disk are private to the gateway's user (issue 10, item 18).

Real processes where the files come from one (``manage.py migrate``, ``make .env``): the
modes are what the code asks for, whatever the umask of the test run.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.conf import checks as gateway_checks
from gateway.metering.journal import JournalWriter
from gateway.metering.spool import Spool
from tests.unit.test_commands import _env as commands_env

ROOT = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    """The common default umask (022), under which files come out readable by everyone."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def process_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """A clean process environment with the default database (SQLite in the data directory)."""
    return commands_env(tmp_path, **{"DATABASE_URL": "", **overrides})


def test_data_directory_database_and_broker_folders_are_private(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v", "0"],
        cwd=ROOT,
        env=process_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    data = tmp_path / "data"
    assert mode(data) == 0o700
    database = data / "gateway.sqlite3"
    assert mode(database) == 0o600
    for folder in ("queue", "processed", "control"):
        assert mode(data / "celery" / folder) == 0o700, folder
    # SQLite gives its WAL and shared-memory files the database file's mode.
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        connection.execute("CREATE TABLE probe (x)")
        assert mode(data / "gateway.sqlite3-wal") == 0o600
        assert mode(data / "gateway.sqlite3-shm") == 0o600


def test_usage_journal_and_spool_are_private(tmp_path: Path) -> None:
    event = {"request_id": "req_1", "status": 200}
    journal = JournalWriter(tmp_path / "usage-journal")
    journal.record(event)
    journal.flush_sync()
    Spool(tmp_path / "usage-spool").write([event])
    for folder in ("usage-journal", "usage-spool"):
        assert mode(tmp_path / folder) == 0o700, folder
        files = list((tmp_path / folder).iterdir())
        assert files, folder
        assert {mode(path) for path in files} == {0o600}, folder


def test_genkeys_output_writes_a_private_file_once(tmp_path: Path) -> None:
    target = tmp_path / ".env"
    command = [sys.executable, "manage.py", "genkeys", "--output", str(target)]
    done = subprocess.run(command, cwd=ROOT, env=process_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert mode(target) == 0o600
    text = target.read_text()
    assert [line.split("=", 1)[0] for line in text.splitlines()] == ["SECRET_KEY", "GATEWAY_ENCRYPTION_KEY"]
    assert text.split("=")[1] not in done.stdout  # the secret is not echoed

    again = subprocess.run(command, cwd=ROOT, env=process_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert again.returncode != 0
    assert "exists" in again.stderr
    assert target.read_text() == text  # never overwritten


def test_make_writes_a_private_env_file(tmp_path: Path) -> None:
    """The Makefile's own ``.env`` rule, run by make in a scratch project directory."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("manage.py", ".venv"):
        (project / name).symlink_to(ROOT / name)
    done = subprocess.run(
        ["make", "-f", str(ROOT / "Makefile"), "-o", ".venv/.installed", ".env"],  # -o: never reinstall here
        cwd=project,
        env={**process_env(tmp_path), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert mode(project / ".env") == 0o600
    assert "GATEWAY_ENCRYPTION_KEY=" in (project / ".env").read_text()


def test_w001_reports_files_that_others_can_read(settings: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (tmp_path / ".env").write_text("SECRET_KEY=x\n")
    (tmp_path / ".env").chmod(0o644)
    settings.BASE_DIR = tmp_path
    settings.DATA_DIR = data
    found = [m for m in gateway_checks.check_private_files() if str(tmp_path) in m.msg]
    assert [m.id for m in found] == ["gateway.W001", "gateway.W001"]
    assert "chmod 600" in (found[0].hint or "")
    assert "chmod 700" in (found[1].hint or "")
    (tmp_path / ".env").chmod(0o600)
    data.chmod(0o700)
    assert [m for m in gateway_checks.check_private_files() if str(tmp_path) in m.msg] == []
