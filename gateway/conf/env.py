"""Small typed helpers that read configuration from the environment.

Parsing problems are collected instead of raised, so that Django can start far
enough to report every one of them through system checks (see gateway/conf/checks.py)
with a stable id and a sentence saying what to set.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

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
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        _error("gateway.E011", f"{name}={raw!r} is not an integer: set it to a whole number.")
        return default
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and {maximum}" if maximum is not None else ""
        _error("gateway.E011", f"{name}={value} is out of range: set it between {minimum}{upper}.")
        return default
    return value


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        _error("gateway.E012", f"{name}={raw!r} is not a number: set it to a number of seconds.")
        return default
    if value < minimum:
        _error("gateway.E012", f"{name}={value} is below {minimum}: set a larger value.")
        return default
    return value


def database_from_url(url: str, default_sqlite_path: str) -> dict[str, object]:
    """Turn DATABASE_URL into a Django DATABASES entry.

    Supported: ``sqlite:///relative/or/absolute.db`` and
    ``postgres://user:pass@host:port/name`` (also ``postgresql://``).
    """
    sqlite_default: dict[str, object] = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": default_sqlite_path,
        # WAL lets the background usage flusher write while the console reads.
        # IMMEDIATE: a read-then-write transaction (an operator command) takes the write lock
        # up front instead of failing with "database is locked" against the usage writer.
        "OPTIONS": {"init_command": "PRAGMA journal_mode=WAL;", "timeout": 20, "transaction_mode": "IMMEDIATE"},
    }
    if not url:
        return sqlite_default
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        # sqlite:///relative.db or sqlite:////absolute/path.db
        name = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not name:
            _error("gateway.E003", "DATABASE_URL sqlite form is sqlite:///relative.db or sqlite:////abs/path.db.")
            return sqlite_default
        return {**sqlite_default, "NAME": name}
    if parts.scheme in ("postgres", "postgresql", "pgsql"):
        if not parts.path.strip("/"):
            _error("gateway.E003", "DATABASE_URL has no database name: use postgres://user@host:5432/NAME.")
            return sqlite_default
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": parts.path.lstrip("/"),
            "USER": parts.username or "",
            "PASSWORD": parts.password or "",
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            "CONN_MAX_AGE": 60,
            "CONN_HEALTH_CHECKS": True,
        }
    _error(
        "gateway.E003",
        f"DATABASE_URL scheme {parts.scheme!r} is not supported: use sqlite:///path.db "
        "or postgres://user:password@host:5432/name.",
    )
    return sqlite_default


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
