"""Small typed helpers that read configuration from the environment.

Parsing problems are collected instead of raised, so that Django can start far
enough to report every one of them through system checks (see gateway/conf/checks.py)
with a stable id and a sentence saying what to set.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import dj_database_url

CONFIG_ERRORS: list[tuple[str, str]] = []


def _error(check_id: str, message: str) -> None:
    CONFIG_ERRORS.append((check_id, message))


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    _error("gateway.E010", f"{name}={raw!r} is not a boolean: set it to true or false.")
    return default


def env_int(name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    return _env_number(name, default, int, "gateway.E011", "an integer: set it to a whole number", minimum, maximum)


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    return _env_number(name, default, float, "gateway.E012", "a number: set it to a number of seconds", minimum, None)


_RATE = re.compile(r"[1-9][0-9]*/(s|sec|second|m|min|minute|h|hour|d|day)")


def env_rate(name: str, default: str) -> str:
    """A request rate as DRF's throttles take it (``N/sec``, ``N/min``, ``N/hour``, ``N/day``)."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if not _RATE.fullmatch(raw.strip()):
        _error("gateway.E013", f"{name}={raw!r} is not a rate: set it like 60/min (per sec, min, hour or day).")
        return default
    return raw.strip()


N = TypeVar("N", int, float)


def _env_number(
    name: str, default: N, parse: Callable[[str], N], code: str, what: str, minimum: N, maximum: N | None
) -> N:
    """``name`` parsed as a number in range, else ``default`` with the error ``code`` recorded."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        _error(code, f"{name}={raw!r} is not {what}.")
        return default
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"set it between {minimum} and {maximum}" if maximum is not None else f"set it to {minimum} or more"
        _error(code, f"{name}={value} is out of range: {bound}.")
        return default
    return value


def env_list(name: str, default: str = "") -> list[str]:
    """A comma-separated list; blanks around items and empty items are dropped."""
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


SQLITE_ENGINE = "django.db.backends.sqlite3"
POSTGRES_ENGINE = "django.db.backends.postgresql"
DATABASE_URL_FORMS = "sqlite:///relative.db, sqlite:////absolute/path.db or postgres://user:password@host:5432/name"


def database_from_url(
    url: str,
    default_sqlite_path: str,
    *,
    connect_timeout: float,
    statement_timeout: float,
    sqlite_busy_timeout: float,
) -> dict[str, Any]:
    """Turn DATABASE_URL into a Django DATABASES entry (parsed by dj-database-url).

    Empty: SQLite at ``default_sqlite_path``. Supported: SQLite (``sqlite:///relative.db``,
    ``sqlite:////absolute/path.db``) and PostgreSQL (``postgres://``, ``postgresql://``,
    ``pgsql://``); user and password are percent-decoded, and query parameters become
    connection options (``?sslmode=verify-full&sslrootcert=/path``), which win over the
    defaults below. Each database use is bounded in time:

    - SQLite: WAL (the usage writer writes while others read), IMMEDIATE transactions (a
      read-then-write transaction takes the write lock up front instead of failing with
      "database is locked"), and ``sqlite_busy_timeout`` seconds of waiting for a lock.
    - PostgreSQL: ``connect_timeout`` (libpq, whole seconds, at least 2) and
      ``statement_timeout`` (seconds, 0 = none) on every connection; connections are kept
      60 s and health-checked before reuse.

    A malformed or unsupported URL is reported as ``gateway.E003`` (without the URL, which
    may hold a password) and the SQLite default is used so that the checks can run.
    """
    sqlite_options: dict[str, Any] = {
        "init_command": "PRAGMA journal_mode=WAL;",
        "timeout": sqlite_busy_timeout,
        "transaction_mode": "IMMEDIATE",
    }
    sqlite_default: dict[str, Any] = {"ENGINE": SQLITE_ENGINE, "NAME": default_sqlite_path, "OPTIONS": sqlite_options}
    if not url:
        return sqlite_default
    scheme = urlsplit(url).scheme
    try:
        config: dict[str, Any] = dict(dj_database_url.parse(url))
    except ValueError:
        _error(
            "gateway.E003", f"DATABASE_URL (scheme {scheme!r}) is not supported or malformed: use {DATABASE_URL_FORMS}."
        )
        return sqlite_default
    options: dict[str, Any] = config.setdefault("OPTIONS", {})
    if config["ENGINE"] == SQLITE_ENGINE:
        if config["NAME"] in ("", ":memory:"):
            _error("gateway.E003", f"DATABASE_URL names no SQLite file: use {DATABASE_URL_FORMS}.")
            return sqlite_default
        config["OPTIONS"] = {**sqlite_options, **options}
        return config
    if config["ENGINE"] != POSTGRES_ENGINE:
        _error("gateway.E003", f"DATABASE_URL scheme {scheme!r} is not supported: use {DATABASE_URL_FORMS}.")
        return sqlite_default
    if not config["NAME"]:
        _error("gateway.E003", "DATABASE_URL has no database name: use postgres://user@host:5432/NAME.")
        return sqlite_default
    options.setdefault("connect_timeout", max(2, math.ceil(connect_timeout)))
    server_options = str(options.get("options", ""))
    if "statement_timeout" not in server_options:
        milliseconds = round(statement_timeout * 1000)
        options["options"] = f"{server_options} -c statement_timeout={milliseconds}".strip()
    config.update(CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=True)
    return config


def redis_url(name: str = "REDIS_URL") -> str:
    url = os.environ.get(name, "")
    if url and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        _error("gateway.E004", f"{name} must start with redis://, rediss:// or unix:// (got {urlsplit(url).scheme!r}).")
        return ""
    return url


def load_dotenv(path: os.PathLike[str] | str) -> None:
    """Read KEY=VALUE lines from ``path`` into os.environ without overriding what is set."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        os.environ.setdefault(key.strip(), value.strip().strip('"').strip("'"))
