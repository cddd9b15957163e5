"""Operator commands: stable names, one-line errors, secrets shown once and never echoed."""

from __future__ import annotations

import os
import subprocess
import sys
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.core.management.base import CommandError

from accounts import crypto
from accounts.models import Pool, UpstreamAccount
from tenancy.keys import key_digest
from tenancy.models import ApiKey, Tenant

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


@pytest.mark.django_db
def test_tenant_create() -> None:
    assert "acme" in run("tenant_create", "acme", "--name", "Acme Inc")
    assert Tenant.objects.get(slug="acme").name == "Acme Inc"
    with pytest.raises(CommandError, match="already exists"):
        run("tenant_create", "acme")
    with pytest.raises(CommandError):
        run("tenant_create", "not a slug")


@pytest.mark.django_db
def test_apikey_create_prints_secret_last() -> None:
    run("tenant_create", "acme")
    lines = run("apikey_create", "acme", "--name", "ci", "--models", "gpt-a, gpt-b", "--expires-in-days", "7")
    lines_list = lines.splitlines()
    secret = lines_list[-1]
    assert len(secret) == 56
    assert secret.startswith("sk-gw-")
    assert secret not in "\n".join(lines_list[:-1])
    api_key = ApiKey.objects.get()
    assert api_key.prefix == secret[:16]
    assert api_key.prefix in lines_list[0]
    assert api_key.digest == key_digest(secret)
    assert api_key.allowed_models == ["gpt-a", "gpt-b"]
    assert api_key.expires_at is not None
    assert api_key.name == "ci"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nobody"], "unknown tenant"),
        (["acme", "--expires-in-days", "soon"], "whole number"),
        (["acme", "--expires-in-days", "0"], "at least 1"),
    ],
)
def test_apikey_create_errors(args: list[str], message: str) -> None:
    run("tenant_create", "acme")
    with pytest.raises(CommandError, match=message) as info:
        run("apikey_create", *args)
    assert "\n" not in str(info.value)
    assert not ApiKey.objects.exists()


@pytest.mark.django_db
def test_apikey_revoke() -> None:
    run("tenant_create", "acme")
    secret = run("apikey_create", "acme").splitlines()[-1]
    out = run("apikey_revoke", secret[:16])
    assert "Revoked" in out
    assert ApiKey.objects.get().revoked_at is not None
    assert "already revoked" in run("apikey_revoke", secret)  # a full key works too
    with pytest.raises(CommandError, match="no API key"):
        run("apikey_revoke", "sk-gw-0000000000")


@pytest.mark.django_db
def test_upstream_add_never_echoes_the_key() -> None:
    out = run(
        "upstream_add",
        "main",
        "--base-url",
        "https://api.example.com/v1/",
        "--api-key",
        "sk-upstream-plain",
        "--models",
        "gpt-a,gpt-b",
        "--weight",
        "2",
        "--name",
        "primary",
    )
    assert "sk-upstream-plain" not in out
    assert "https://api.example.com/v1/responses" in out
    account = UpstreamAccount.objects.select_related("pool").get()
    assert account.pool.name == "main"
    assert account.models == ["gpt-a", "gpt-b"]
    assert account.weight == 2
    assert account.name == "primary"
    assert account.credential_encrypted != "sk-upstream-plain"
    assert crypto.decrypt_credential(account.credential_encrypted) == "sk-upstream-plain"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models", "gpt-a"], "--base-url is required"),
        (["--base-url", "ftp://example.com", "--models", "gpt-a"], "http"),
        (["--base-url", "example.com/v1", "--models", "gpt-a"], "http"),
        (["--base-url", "https://api.example.com/v1"], "--models is required"),
        (["--base-url", "https://api.example.com/v1", "--models", "a", "--weight", "0"], "weight"),
        (["--base-url", "https://api.example.com/v1", "--models", "a", "--weight", "x"], "weight"),
    ],
)
def test_upstream_add_errors(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message) as info:
        run("upstream_add", "main", "--api-key", "sk-upstream-plain", *args)
    assert "\n" not in str(info.value)
    assert "sk-upstream-plain" not in str(info.value)
    assert not UpstreamAccount.objects.exists()
    assert not Pool.objects.exists()  # a rejected account leaves no empty pool behind


@pytest.mark.django_db
def test_pool_strip_fields() -> None:
    run("upstream_add", "main", "--base-url", "https://api.example.com/v1", "--models", "gpt-a")
    assert "(default)" in run("pool_strip_fields", "main")
    assert "strips: temperature." in run("pool_strip_fields", "main", "--fields", "temperature")
    assert Pool.objects.get().strip_fields == ["temperature"]
    assert "strips: nothing." in run("pool_strip_fields", "main", "--fields", "")
    assert Pool.objects.get().strip_fields == []
    run("pool_strip_fields", "main", "--default")
    assert Pool.objects.get().strip_fields is None
    with pytest.raises(CommandError, match="not a strippable field"):
        run("pool_strip_fields", "main", "--fields", "model")
    with pytest.raises(CommandError, match="unknown pool"):
        run("pool_strip_fields", "nope", "--default")


def test_genkeys(settings: Any) -> None:
    settings.SECRET_KEY = ""
    settings.GATEWAY_ENCRYPTION_KEY = ""
    lines = run("genkeys").splitlines()
    assert [line.split("=", 1)[0] for line in lines] == ["SECRET_KEY", "GATEWAY_ENCRYPTION_KEY"]
    secret_key = lines[0].split("=", 1)[1]
    assert len(secret_key) >= 50
    Fernet(lines[1].split("=", 1)[1].encode())  # a valid key


# --- real processes -------------------------------------------------------------------


def _env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "DATABASE_URL", "REDIS_URL"))}
    env.update(
        SECRET_KEY="subprocess-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",
        GATEWAY_ENCRYPTION_KEY=Fernet.generate_key().decode(),
        GATEWAY_DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=f"sqlite:///{tmp_path / 'cmd.sqlite3'}",
        DJANGO_SETTINGS_MODULE="gateway.conf.settings",
    )
    env.update(overrides)
    return env


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_apikey_create_in_a_real_process(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert manage(env, "migrate", "-v", "0").returncode == 0
    assert manage(env, "tenant_create", "acme").returncode == 0

    done = manage(env, "apikey_create", "acme", "--models", "gpt-a")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) > 1  # information first
    secret = lines[-1]
    assert secret == secret.strip()
    assert len(secret) == 56
    assert secret.startswith("sk-gw-")

    failed = manage(env, "apikey_create", "nobody")
    assert failed.returncode != 0
    assert failed.stdout == ""
    assert len(failed.stderr.strip().splitlines()) == 1
    assert "unknown tenant 'nobody'" in failed.stderr


def test_genkeys_without_any_keys(tmp_path: Path) -> None:
    # Explicitly empty, so a developer's .env (load_dotenv never overrides) cannot help.
    done = manage(_env(tmp_path, SECRET_KEY="", GATEWAY_ENCRYPTION_KEY=""), "genkeys")
    assert done.returncode == 0, done.stderr
    assert [line.split("=", 1)[0] for line in done.stdout.splitlines()] == ["SECRET_KEY", "GATEWAY_ENCRYPTION_KEY"]
