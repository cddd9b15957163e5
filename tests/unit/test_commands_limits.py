"""Limit flags of apikey_create / tenant_create, apikey_update, tenant_update and price_set."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.core.management.base import CommandError

from tenancy.models import ApiKey, PriceVersion, Tenant

ROOT = Path(__file__).resolve().parents[2]

ALL_KEY_FLAGS = [
    "--rpm",
    "60",
    "--tpm",
    "90000",
    "--concurrency",
    "4",
    "--max-output-tokens",
    "1024",
    "--reasoning-efforts",
    "low, Medium",
    "--allowed-tools",
    "function,web_search",
    "--budget-usd",
    "25.50",
    "--budget-tokens",
    "2000000",
    "--budget-period",
    "week",
    "--budget-soft-percent",
    "75",
    "--allowed-ips",
    "10.0.0.0/8,192.168.1.7",
]


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def fails(*args: str) -> str:
    """Run a command that must fail; return its one-line reason."""
    with pytest.raises(CommandError) as info:
        run(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def acme() -> Tenant:
    run("tenant_create", "acme")
    return Tenant.objects.get(slug="acme")


@pytest.mark.django_db
def test_apikey_create_with_every_limit_flag(acme: Tenant) -> None:
    lines = run("apikey_create", "acme", *ALL_KEY_FLAGS).splitlines()
    secret = lines[-1]  # still alone on the last line
    assert secret.startswith("sk-gw-")
    assert len(secret) == 56
    key = ApiKey.objects.get()
    assert (key.rpm, key.tpm, key.concurrency, key.max_output_tokens) == (60, 90000, 4, 1024)
    assert key.reasoning_efforts == ["low", "medium"]
    assert key.allowed_tools == ["function", "web_search"]
    assert key.budget_usd == Decimal("25.5")
    assert (key.budget_tokens, key.budget_period, key.budget_soft_percent) == (2_000_000, "week", 75)
    assert key.allowed_ips == ["10.0.0.0/8", "192.168.1.7/32"]
    shown = "\n".join(lines[:-1])
    assert "rpm 60" in shown
    assert "25.5 USD" in shown
    assert "192.168.1.7/32" in shown


@pytest.mark.django_db
def test_tenant_create_and_update_round_trip() -> None:
    out = run("tenant_create", "acme", "--rpm", "600", "--budget-usd", "100", "--budget-period", "day")
    assert "rpm 600" in out
    tenant = Tenant.objects.get(slug="acme")
    assert (tenant.rpm, tenant.budget_usd, tenant.budget_period) == (600, Decimal("100"), "day")
    run(
        "tenant_update",
        "acme",
        "--rpm",
        "none",
        "--concurrency",
        "8",
        "--budget-period",
        "fixed",
        "--budget-window-start",
        "2026-01-01",
        "--budget-window-end",
        "2026-04-01T00:00:00+02:00",
    )
    tenant.refresh_from_db()
    assert tenant.rpm is None  # cleared
    assert tenant.concurrency == 8
    assert tenant.budget_usd == Decimal("100")  # left out: kept
    assert tenant.budget_window_start == datetime(2026, 1, 1, tzinfo=UTC)  # no offset: UTC
    assert tenant.budget_window_end == datetime(2026, 3, 31, 22, tzinfo=UTC)
    shown = run("tenant_update", "acme")  # no flags: show
    assert "from 2026-01-01T00:00:00+00:00" in shown
    # Key-only policy is not a tenant flag.
    with pytest.raises(CommandError, match="unrecognized arguments"):
        run("tenant_update", "acme", "--allowed-ips", "10.0.0.0/8")
    assert "unknown tenant" in fails("tenant_update", "nobody", "--rpm", "1")


@pytest.mark.django_db
def test_apikey_update_by_prefix_or_full_key_and_clearing(acme: Tenant) -> None:
    secret = run("apikey_create", "acme", *ALL_KEY_FLAGS).splitlines()[-1]
    out = run("apikey_update", secret[:16], "--rpm", "120", "--allowed-ips", "none", "--reasoning-efforts", "NONE")
    assert out.startswith(f"Updated API key {secret[:16]} of tenant acme")
    assert secret not in out
    key = ApiKey.objects.get()
    assert (key.rpm, key.allowed_ips, key.reasoning_efforts) == (120, None, None)
    assert key.tpm == 90000  # left out: kept
    run("apikey_update", secret, "--budget-usd", "none", "--budget-soft-percent", "none", "--allowed-tools", "")
    key.refresh_from_db()
    assert (key.budget_usd, key.budget_soft_percent, key.allowed_tools) == (None, None, [])
    shown = run("apikey_update", secret[:16])
    assert "tools none allowed" in shown
    assert "no soft alert" in shown
    message = fails("apikey_update", secret[:15] + "X" + secret[16:], "--rpm", "1")
    assert "no API key with prefix" in message
    assert secret[16:] not in message  # a pasted full key is never echoed


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--allowed-ips", "10.0.0.0/8,300.1.1.1"], "'300.1.1.1' is not an IP address"),
        (["--allowed-ips", ""], "at least one"),
        (["--rpm", "lots"], "--rpm must be a whole number"),
        (["--tpm", "0"], "--tpm must be a whole number of at least 1"),
        (["--budget-soft-percent", "150"], "from 1 to 100"),
        (["--budget-usd", "ten"], "decimal number"),
        (["--budget-usd", "-5"], "greater than 0"),
        (["--budget-period", "year"], "--budget-period must be one of"),
        (["--budget-period", "none"], "cannot be cleared"),
        (["--budget-period", "fixed"], "needs both"),
        (["--budget-window-start", "yesterday"], "ISO date"),
        (["--budget-window-start", "2026-01-01", "--budget-window-end", "2026-02-01"], "only used with"),
    ],
)
def test_apikey_update_errors_are_one_line(acme: Tenant, flags: list[str], fragment: str) -> None:
    secret = run("apikey_create", "acme", "--rpm", "5").splitlines()[-1]
    assert fragment in fails("apikey_update", secret[:16], "--rpm", "6", *flags)
    assert ApiKey.objects.get().rpm == 5  # nothing changed


@pytest.mark.django_db
def test_create_commands_refuse_bad_limits(acme: Tenant) -> None:
    assert "is not an IP address" in fails("apikey_create", "acme", "--allowed-ips", "nope")
    assert "leave the flag out" in fails("apikey_create", "acme", "--rpm", "none")
    assert not ApiKey.objects.exists()
    assert "--concurrency" in fails("tenant_create", "other", "--concurrency", "-1")
    assert not Tenant.objects.filter(slug="other").exists()


@pytest.mark.django_db
def test_price_set() -> None:
    out = run(
        "price_set",
        "gpt-a",
        "--input",
        "2.50",
        "--cached-input",
        "1.25",
        "--cache-write",
        "3.125",
        "--output",
        "10",
        "--effective-from",
        "2026-02-01",
    )
    assert "gpt-a" in out
    price = PriceVersion.objects.get()
    assert (price.input, price.cached_input, price.cache_write, price.output) == (
        Decimal("2.5"),
        Decimal("1.25"),
        Decimal("3.125"),
        Decimal("10"),
    )
    assert price.reasoning is None
    assert price.effective_from == datetime(2026, 2, 1, tzinfo=UTC)
    run(
        "price_set",
        "gpt-a",
        "--input",
        "3",
        "--cached-input",
        "1",
        "--cache-write",
        "3",
        "--output",
        "12",
        "--reasoning",
        "15",
    )
    assert PriceVersion.objects.count() == 2  # a new version, the old one kept
    assert PriceVersion.objects.latest("id").reasoning == Decimal("15")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--cached-input", "1", "--cache-write", "1", "--output", "1"], "--input is required"),
        (["--input", "1", "--cached-input", "1", "--cache-write", "1"], "--output is required"),
        (["--input", "-1", "--cached-input", "1", "--cache-write", "1", "--output", "1"], "input must be 0 or more"),
        (["--input", "x", "--cached-input", "1", "--cache-write", "1", "--output", "1"], "decimal number"),
        (
            ["--input", "1", "--cached-input", "1", "--cache-write", "1", "--output", "1", "--effective-from", "soon"],
            "--effective-from must be an ISO date",
        ),
    ],
)
def test_price_set_errors(args: list[str], fragment: str) -> None:
    assert fragment in fails("price_set", "gpt-a", *args)
    assert not PriceVersion.objects.exists()


def test_help_documents_clearing() -> None:
    from tenancy.management.commands.apikey_update import Command

    parser = Command().create_parser("manage.py", "apikey_update")
    text = parser.format_help()
    assert "'none' clears it" in text
    for flag in ("--rpm", "--allowed-tools", "--allowed-ips", "--budget-window-end", "--max-output-tokens"):
        assert flag in text


# --- a real process: exit status and a one-line reason ----------------------------------------


def _env(tmp_path: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "DATABASE_URL", "REDIS_URL"))}
    env.update(
        SECRET_KEY="subprocess-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",
        GATEWAY_ENCRYPTION_KEY=Fernet.generate_key().decode(),
        GATEWAY_DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=f"sqlite:///{tmp_path / 'cmd.sqlite3'}",
        DJANGO_SETTINGS_MODULE="gateway.conf.settings",
    )
    return env


def test_limit_commands_in_a_real_process(tmp_path: Path) -> None:
    env = _env(tmp_path)

    def manage(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )

    assert manage("migrate", "-v", "0").returncode == 0
    assert manage("tenant_create", "acme", "--rpm", "100").returncode == 0
    created = manage("apikey_create", "acme", "--rpm", "10")
    assert created.returncode == 0, created.stderr
    prefix = created.stdout.splitlines()[-1][:16]
    done = manage("apikey_update", prefix, "--rpm", "none", "--allowed-ips", "10.0.0.0/8")
    assert done.returncode == 0, done.stderr
    failed = manage("apikey_update", prefix, "--allowed-ips", "10.0.0.0/8,not-a-network")
    assert failed.returncode != 0
    assert failed.stdout == ""
    assert len(failed.stderr.strip().splitlines()) == 1
    assert "'not-a-network' is not an IP address" in failed.stderr
    missing = manage("price_set", "gpt-a", "--input", "1")
    assert missing.returncode != 0
    assert len(missing.stderr.strip().splitlines()) == 1
