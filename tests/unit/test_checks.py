"""System checks: stable ids, a hint each, no secrets in messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.core import checks

from gateway.conf import checks as gateway_checks
from gateway.conf import env

ROOT = Path(__file__).resolve().parents[2]


def ids(messages: list[checks.CheckMessage]) -> list[str | None]:
    return [m.id for m in messages]


@pytest.mark.parametrize("value", ["", "too-short"])
def test_e001_secret_key(settings: Any, value: str) -> None:
    settings.SECRET_KEY = value
    found = gateway_checks.check_secret_key()
    assert ids(found) == ["gateway.E001"]
    assert "secrets.token_urlsafe(50)" in (found[0].hint or "")
    if value:
        assert value not in found[0].msg


def test_e001_passes_with_a_long_key(settings: Any) -> None:
    settings.SECRET_KEY = "x" * 50
    assert gateway_checks.check_secret_key() == []


@pytest.mark.parametrize("value", ["", "bm90LWEta2V5", "A" * 44, "é" * 44])
def test_e002_encryption_key(settings: Any, value: str) -> None:
    settings.GATEWAY_ENCRYPTION_KEY = value
    found = gateway_checks.check_encryption_key()
    assert ids(found) == ["gateway.E002"]
    assert "genkeys" in (found[0].hint or "")
    assert "Fernet.generate_key()" in (found[0].hint or "")
    if value:
        assert value not in found[0].msg


def test_e002_passes_with_a_fernet_key(settings: Any) -> None:
    settings.GATEWAY_ENCRYPTION_KEY = Fernet.generate_key().decode()
    assert gateway_checks.check_encryption_key() == []


def test_env_errors_are_reported_with_their_ids(config_errors: list[tuple[str, str]]) -> None:
    assert gateway_checks.check_environment() == []
    timeouts = {"connect_timeout": 5.0, "statement_timeout": 30.0, "sqlite_busy_timeout": 20.0}
    env.database_from_url("mysql://db/gateway", "/tmp/unused.sqlite3", **timeouts)
    env.database_from_url("postgres://db:5432/", "/tmp/unused.sqlite3", **timeouts)
    config_errors.append(("gateway.E004", "REDIS_URL must start with redis://"))
    config_errors.append(("gateway.E011", "PORT='x' is not an integer: set it to a whole number."))
    found = gateway_checks.check_environment()
    assert ids(found) == ["gateway.E003", "gateway.E003", "gateway.E004", "gateway.E011"]
    assert all(isinstance(m, checks.Error) and m.hint for m in found)
    assert "DATABASE_URL" in (found[0].hint or "")


def test_e005_e006_choices(settings: Any) -> None:
    settings.GATEWAY_UPSTREAM_TRANSPORT = "httpx"
    settings.GATEWAY_SERVER = "uvicorn"
    assert gateway_checks.check_choices() == []
    settings.GATEWAY_UPSTREAM_TRANSPORT = "requests"
    settings.GATEWAY_SERVER = "gunicorn"
    found = gateway_checks.check_choices()
    assert ids(found) == ["gateway.E005", "gateway.E006"]
    assert all(m.hint for m in found)


def test_checks_are_registered_for_every_command(settings: Any, config_errors: list[tuple[str, str]]) -> None:
    settings.SECRET_KEY = ""
    settings.GATEWAY_ENCRYPTION_KEY = ""
    settings.GATEWAY_SERVER = "gunicorn"
    config_errors.append(("gateway.E003", "DATABASE_URL scheme 'mysql' is not supported."))
    found = {m.id for m in checks.run_checks(include_deployment_checks=False)}
    assert {"gateway.E001", "gateway.E002", "gateway.E003", "gateway.E006"} <= found


def test_manage_check_fails_in_a_real_process(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "DATABASE_URL", "REDIS_URL"))}
    environ.update(
        SECRET_KEY="",  # explicitly empty: a developer's .env never overrides the environment
        GATEWAY_ENCRYPTION_KEY=Fernet.generate_key().decode(),
        GATEWAY_DATA_DIR=str(tmp_path),
        DATABASE_URL="mysql://db/gateway",
        DJANGO_SETTINGS_MODULE="gateway.conf.settings",
    )
    done = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "gateway.E001" in done.stderr
    assert "gateway.E003" in done.stderr
    assert "gateway.E002" not in done.stderr
