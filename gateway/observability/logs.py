"""Log formats and the access line of each data-plane request.

``GATEWAY_LOG_FORMAT=json`` (the default unless ``DEBUG``) writes one JSON object a line
(python-json-logger's orjson formatter, configured in ``LOGGING``); ``text`` writes
``time level logger message`` followed by the record's extra fields as ``key=value``
(:class:`TextFormatter`). Either way :func:`access` emits one line per request for the logger
``gateway.access`` with the fields of :data:`ACCESS_FIELDS`, never a secret (the key appears as
its public prefix) nor a prompt. In JSON the access line skips the ``logging`` machinery (it is
on every request's path: :func:`write_json_line`); its level still follows ``LOG_LEVEL``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import orjson
from django.conf import settings
from pythonjsonlogger.core import RESERVED_ATTRS

if TYPE_CHECKING:
    from gateway.dataplane.exchange import Exchange

ACCESS_LOGGER = "gateway.access"
access_logger = logging.getLogger(ACCESS_LOGGER)
STDERR = 2

ACCESS_FIELDS = (
    "request_id", "method", "path", "tenant_id", "key_prefix", "model", "upstream_model", "account_id", "status",
    "outcome", "error_code", "attempts", "stream", "input_tokens", "output_tokens", "total_tokens", "latency_ms",
    "ttfb_ms", "trace_id",
)  # fmt: skip
_RESERVED = frozenset(RESERVED_ATTRS) | {"message", "asctime", "taskName"}


class TextFormatter(logging.Formatter):
    """The development format: the plain line, then ``key=value`` for each extra field."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = [f"{key}={value}" for key, value in record.__dict__.items() if key not in _RESERVED]
        return f"{line} {' '.join(extra)}" if extra else line


def access(ex: Exchange, method: str, path: str, now: float, trace_id: str = "") -> None:
    """Log the access line of a finished request (``now``: ``time.monotonic()`` at its end)."""
    if not access_logger.isEnabledFor(logging.INFO):
        return
    status, outcome, usage, _, ttfb = ex.final or (500, "failed", {}, "", None)
    key = ex.key
    fields: dict[str, Any] = {
        "request_id": ex.request_id,
        "method": method,
        "path": path,
        "tenant_id": key.tenant_id if key is not None else None,
        "key_prefix": key.prefix if key is not None else None,
        "model": ex.model if ex.planned else None,
        "upstream_model": ex.upstream_model or None,
        "account_id": ex.account.account_id if ex.account is not None else None,
        "status": status,
        "outcome": outcome,
        "error_code": ex.error_code or None,
        "attempts": len(ex.attempts) + (1 if ex.attempt_started else 0),
        "stream": ex.stream,
        "input_tokens": usage.get("input_tokens"),
        "output_tokens": usage.get("output_tokens"),
        "total_tokens": usage.get("total_tokens"),
        "latency_ms": round((now - ex.started) * 1000, 3),
        "ttfb_ms": round(ttfb, 3) if ttfb is not None else None,
        "trace_id": trace_id or None,
    }
    message = f"{method} {path} {status}"
    if settings.GATEWAY_LOG_FORMAT == "json":
        write_json_line(message, fields)
    else:
        access_logger.info(message, extra=fields)


def write_json_line(message: str, fields: dict[str, Any], fd: int = STDERR) -> None:
    """One access line as JSON straight to ``fd`` (stderr, where the log handler writes too):
    the same keys as the JSON formatter's lines, at ~1.5 µs instead of ~27 µs through
    ``logging`` and python-json-logger. One ``os.write`` of a whole line (never interleaved
    with another line); a failing write is dropped like a failing log handler would."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"
    line = {"time": stamp, "level": "INFO", "logger": ACCESS_LOGGER, "message": message, **fields}
    with contextlib.suppress(OSError):
        os.write(fd, orjson.dumps(line) + b"\n")
