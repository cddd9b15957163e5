"""Log formats and the access line of each data-plane request.

``GATEWAY_LOG_FORMAT=json`` (the default unless ``DEBUG``) writes one JSON object a line
(python-json-logger's orjson formatter, configured in ``LOGGING``); ``text`` writes
``time level logger message`` followed by the record's extra fields as ``key=value``
(:class:`TextFormatter`). Either way :func:`access` emits one line per request on the logger
``gateway.access`` with the fields of :data:`ACCESS_FIELDS`, never a secret (the key appears as
its public prefix) nor a prompt.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pythonjsonlogger.core import RESERVED_ATTRS

if TYPE_CHECKING:
    from gateway.dataplane.exchange import Exchange

access_logger = logging.getLogger("gateway.access")

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
    access_logger.info("%s %s %d", method, path, status, extra=fields)
