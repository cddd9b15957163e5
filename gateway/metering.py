"""Usage records leave the request path here.

The hot path calls :meth:`UsageMeter.record` (a list append). A background task writes
batches through ``tenancy.services.usage_records_write`` (idempotent on request id).
Nothing is dropped: a failed write keeps the batch for the next try, and records still
unwritten at shutdown are spooled to ``DATA_DIR/usage-spool/`` and replayed on start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from asgiref.sync import sync_to_async

logger = logging.getLogger(__name__)

Writer = Callable[[Sequence[dict[str, Any]]], object]

_DATETIME_FIELDS = ("created_at",)


def _default_writer(events: Sequence[dict[str, Any]]) -> object:
    from django.db import close_old_connections

    from tenancy.services import usage_records_write

    # A connection broken by a database outage stays broken: drop it before each batch.
    close_old_connections()
    return usage_records_write(events)


class UsageMeter:
    """Buffers usage events and writes them in batches off the request path."""

    def __init__(self, spool_dir: Path, *, interval: float = 0.5, writer: Writer = _default_writer) -> None:
        self._buffer: list[dict[str, Any]] = []
        self._spool_dir = spool_dir
        self._interval = interval
        self._writer = writer
        self._task: asyncio.Task[None] | None = None
        self.written = 0

    def record(self, event: dict[str, Any]) -> None:
        """Queue one usage event (a dict of UsageRecord fields). Never blocks, never raises."""
        self._buffer.append(event)
        if self._task is None:
            self._start()

    def pending(self) -> int:
        return len(self._buffer)

    def _start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        backoff = self._interval
        spool_pending = self._spool_dir.is_dir()
        while True:
            await asyncio.sleep(backoff)
            if spool_pending:
                try:
                    await sync_to_async(self.drain_spool, thread_sensitive=False)()
                    spool_pending = False
                except Exception:
                    logger.warning("replaying spooled usage failed; will retry", exc_info=True)
            if not self._buffer:
                continue
            batch, self._buffer = self._buffer, []
            try:
                await sync_to_async(self._writer, thread_sensitive=False)(batch)
            except asyncio.CancelledError:
                self._buffer[:0] = batch
                raise
            except Exception:
                # The database may be down: keep everything and retry, slower each time.
                self._buffer[:0] = batch
                backoff = min(backoff * 2, 10.0)
                logger.warning("usage write failed; %d records kept for retry", len(self._buffer), exc_info=True)
                continue
            self.written += len(batch)
            backoff = self._interval

    async def aclose(self) -> None:
        """Stop the background task and write (or spool) whatever is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._buffer:
            await sync_to_async(self.flush_sync, thread_sensitive=False)()

    def flush_sync(self) -> None:
        """Write what is buffered now; spool it to disk if the database refuses."""
        batch, self._buffer = self._buffer, []
        if not batch:
            return
        try:
            self._writer(batch)
            self.written += len(batch)
        except Exception:
            logger.warning("usage write failed at shutdown; spooling %d records", len(batch), exc_info=True)
            self._spool(batch)

    def _spool(self, batch: Sequence[dict[str, Any]]) -> None:
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        path = self._spool_dir / f"{time.time_ns()}-{uuid.uuid4().hex}.jsonl"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            for event in batch:
                handle.write(orjson.dumps(event) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def drain_spool(self) -> int:
        """Write spooled records, removing each file only after its rows are written.

        A crash between the write and the removal only repeats an idempotent write.
        """
        if not self._spool_dir.is_dir():
            return 0
        count = 0
        for path in sorted(self._spool_dir.glob("*.jsonl")):
            events = [_decode(line) for line in path.read_bytes().splitlines() if line.strip()]
            if events:
                self._writer(events)
            path.unlink()
            count += len(events)
        if count:
            logger.info("replayed %d spooled usage records", count)
        return count


def _decode(line: bytes) -> dict[str, Any]:
    event: dict[str, Any] = orjson.loads(line)
    for key in _DATETIME_FIELDS:
        if isinstance(event.get(key), str):
            event[key] = datetime.fromisoformat(event[key]).astimezone(UTC)
    return event
