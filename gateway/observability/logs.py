"""Log formats and the access line of each data-plane request.

``GATEWAY_LOG_FORMAT=json`` (the default unless ``DEBUG``) writes one JSON object a line
(python-json-logger's orjson formatter, configured in ``LOGGING``); ``text`` writes
``time level logger message`` followed by the record's extra fields as ``key=value``
(:class:`TextFormatter`). Either way :func:`access` emits one line per request for the logger
``gateway.access`` with the fields of :data:`ACCESS_FIELDS`, never a secret (the key appears as
its public prefix) nor a prompt. In JSON the access line skips the ``logging`` machinery (it is
on every request's path: :class:`AccessLog`); its level still follows ``LOG_LEVEL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from typing import TYPE_CHECKING, Any

import orjson
from pythonjsonlogger.core import RESERVED_ATTRS

from gateway.conf.hot import hot

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


def access(ex: Exchange, method: str, path: str, now: float, trace_id: str = "", sink: AccessLog | None = None) -> None:
    """Log the access line of a finished request (``now``: ``time.monotonic()`` at its end).
    In JSON the line goes to ``sink`` (buffered, see :class:`AccessLog`), else straight to stderr."""
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
    if hot.GATEWAY_LOG_FORMAT == "json":
        line = json_line(message, fields)
        if sink is not None:
            sink.write(line)
        else:
            with contextlib.suppress(OSError):
                os.write(STDERR, line)
    else:
        access_logger.info(message, extra=fields)


_stamp_second = -1
_stamp_text = ""


def json_line(message: str, fields: dict[str, Any]) -> bytes:
    """One access line as JSON, newline included, with the same keys as the JSON formatter's
    lines (the time as ``logging`` writes it, local time with milliseconds)."""
    global _stamp_second, _stamp_text
    now = time.time()
    second = int(now)
    if second != _stamp_second:  # one strftime a second, not one a line
        _stamp_second, _stamp_text = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
    stamp = f"{_stamp_text},{int(now % 1 * 1000):03d}"
    return orjson.dumps(
        {"time": stamp, "level": "INFO", "logger": ACCESS_LOGGER, "message": message, **fields},
        option=orjson.OPT_APPEND_NEWLINE,
    )


class AccessLog:
    """Access lines written to ``fd`` (stderr, where the log handler writes too) in batches.

    A line written from the event loop waits at most ``interval`` seconds (or until ``limit``
    bytes wait) and goes out with the others in one ``os.write``; outside a running loop it is
    written at once. Measured under ``make bench``: one ``os.write`` per request cost ~27 µs of
    the serving process's CPU per request (bench/results/20261205T203247Z.json, ``nolog``
    column); batched, ~2 µs. A batch never splits a line. When ``fd`` is a pipe or a socket
    (a container's log collector), a write holds at most ``PIPE_BUF`` bytes of whole lines, so
    that the lines of several processes writing the same pipe never interleave; a longer line
    goes out alone. :meth:`flush` writes what waits (the runtime calls it at shutdown, so only a
    hard kill loses the last ``interval`` of lines); a failing write drops its batch, as a
    failing log handler drops its record.
    """

    def __init__(self, fd: int = STDERR, interval: float = 0.05, limit: int = 64 * 1024) -> None:
        self.fd = fd
        self.interval = interval
        self.limit = limit
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            mode = 0
        self._chunk = pipe_buf(fd) if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) else 0

    def write(self, line: bytes) -> None:
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.limit:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self.interval, self.flush)

    def flush(self) -> None:
        """Write every waiting line now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._lines, self._size = self._lines, [], 0
        if not lines:
            return
        with contextlib.suppress(OSError):
            for chunk in self._chunks(lines):
                _write_all(self.fd, chunk)

    def _chunks(self, lines: list[bytes]) -> list[bytes]:
        if not self._chunk:
            return [b"".join(lines)]
        chunks: list[bytes] = []
        batch: list[bytes] = []
        size = 0
        for line in lines:
            if batch and size + len(line) > self._chunk:
                chunks.append(b"".join(batch))
                batch, size = [], 0
            batch.append(line)
            size += len(line)
        chunks.append(b"".join(batch))
        return chunks


def pipe_buf(fd: int) -> int:
    """The size up to which a write to a pipe is atomic (POSIX: at least 512; Linux: 4096)."""
    try:
        return max(512, os.fpathconf(fd, "PC_PIPE_BUF"))
    except (OSError, ValueError):
        return 4096


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
