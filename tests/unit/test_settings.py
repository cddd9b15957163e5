"""The settings module: DATABASE_URL parsing and database timeouts."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

from gateway.conf import env


def load_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **environ: str) -> dict[str, Any]:
    """The settings module run afresh under ``environ`` (and a data directory in ``tmp_path``)."""
    monkeypatch.setenv("GATEWAY_DATA_DIR", str(tmp_path / "data"))
    for name in ("DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(Path(env.__file__).with_name("settings.py")))


def parse(url: str, connect: float = 5.0, statement: float = 30.0, busy: float = 20.0) -> dict[str, Any]:
    return env.database_from_url(
        url, "/tmp/default.sqlite3", connect_timeout=connect, statement_timeout=statement, sqlite_busy_timeout=busy
    )


def test_database_url_decodes_a_percent_encoded_password(config_errors: list[tuple[str, str]]) -> None:
    db = parse("postgres://gw%40user:p%40ss%2Fw%3Ard%25@db.example:5433/gateway")
    assert (db["USER"], db["PASSWORD"]) == ("gw@user", "p@ss/w:rd%")
    assert (db["HOST"], str(db["PORT"]), db["NAME"]) == ("db.example", "5433", "gateway")
    assert config_errors == []


def test_database_url_keeps_query_options(config_errors: list[tuple[str, str]]) -> None:
    db = parse("postgresql://u:p@db/gateway?sslmode=verify-full&sslrootcert=/etc/ca.pem")
    assert db["OPTIONS"]["sslmode"] == "verify-full"
    assert db["OPTIONS"]["sslrootcert"] == "/etc/ca.pem"
    assert config_errors == []


def test_postgres_connections_get_a_connect_and_a_statement_timeout(config_errors: list[tuple[str, str]]) -> None:
    db = parse("postgres://gw@db:5432/gateway", connect=7.5, statement=12.5)
    assert db["ENGINE"] == "django.db.backends.postgresql"
    assert db["OPTIONS"]["connect_timeout"] == 8  # libpq takes whole seconds
    assert db["OPTIONS"]["options"] == "-c statement_timeout=12500"
    assert (db["CONN_MAX_AGE"], db["CONN_HEALTH_CHECKS"]) == (60, True)
    assert parse("postgres://gw@db/gateway", connect=1)["OPTIONS"]["connect_timeout"] == 2  # libpq's minimum


def test_url_options_win_over_the_timeouts(config_errors: list[tuple[str, str]]) -> None:
    db = parse("postgres://gw@db/gateway?connect_timeout=20&options=-c%20statement_timeout%3D0")
    assert db["OPTIONS"]["connect_timeout"] == 20
    assert db["OPTIONS"]["options"] == "-c statement_timeout=0"
    schema = parse("postgres://gw@db/gateway?currentSchema=billing")
    assert schema["OPTIONS"]["options"] == "-c search_path=billing -c statement_timeout=30000"


@pytest.mark.parametrize(
    ("url", "name"),
    [("", "/tmp/default.sqlite3"), ("sqlite:///rel/gw.db", "rel/gw.db"), ("sqlite:////abs/gw.db", "/abs/gw.db")],
)
def test_sqlite_keeps_wal_immediate_and_its_busy_timeout(
    config_errors: list[tuple[str, str]], url: str, name: str
) -> None:
    db = parse(url, busy=3.5)
    assert (db["ENGINE"], db["NAME"]) == ("django.db.backends.sqlite3", name)
    assert db["OPTIONS"] == {
        "init_command": "PRAGMA journal_mode=WAL;",
        "timeout": 3.5,
        "transaction_mode": "IMMEDIATE",
    }
    assert config_errors == []


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u:secret-pw@db/gateway",  # a scheme dj-database-url knows but the gateway does not support
        "oops://u:secret-pw@db/gateway",  # unknown
        "postgres://u:secret-pw@db:5432/",  # no database name
        "postgres://u:secret-pw@db:port/gateway",  # malformed port
        "sqlite://",  # in memory: the usage writer process could not see it
    ],
)
def test_bad_urls_are_reported_without_the_password(config_errors: list[tuple[str, str]], url: str) -> None:
    db = parse(url)
    assert db["NAME"] == "/tmp/default.sqlite3"  # start-up goes on far enough to report it
    assert [check_id for check_id, _ in config_errors] == ["gateway.E003"]
    assert "secret-pw" not in config_errors[0][1]


def test_the_settings_module_reads_the_database_timeouts(
    config_errors: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = load_settings(
        monkeypatch,
        tmp_path,
        DATABASE_URL="postgres://gw:p%23w@db/gateway?sslmode=require",
        GATEWAY_DB_CONNECT_TIMEOUT="3",
        GATEWAY_DB_STATEMENT_TIMEOUT="4",
    )
    db = settings["DATABASES"]["default"]
    assert (db["PASSWORD"], db["OPTIONS"]["sslmode"]) == ("p#w", "require")
    assert (db["OPTIONS"]["connect_timeout"], db["OPTIONS"]["options"]) == (3, "-c statement_timeout=4000")
    assert config_errors == []


@pytest.mark.django_db
def test_the_database_connection_has_its_timeouts(settings: Any) -> None:
    """On the real connection of this run (SQLite or PostgreSQL), not only in the settings."""
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("PRAGMA busy_timeout")
            assert cursor.fetchone()[0] == round(settings.GATEWAY_SQLITE_BUSY_TIMEOUT * 1000)
            cursor.execute("PRAGMA journal_mode")
            assert cursor.fetchone()[0] == "wal"
        else:
            cursor.execute("SELECT current_setting('statement_timeout')")
            assert cursor.fetchone()[0] == f"{round(settings.GATEWAY_DB_STATEMENT_TIMEOUT)}s"
            parameters = connection.connection.info.get_parameters()
            assert parameters["connect_timeout"] == str(round(settings.GATEWAY_DB_CONNECT_TIMEOUT))
