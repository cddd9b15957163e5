"""Health transitions leave the request path here, in batches.

The health stores call :meth:`TransitionLog.add` (a list append); the background writer
(:class:`accounts.infra.batching.BackgroundFlush`) writes what accumulated ``interval``
seconds after the first of them through
``accounts.services.account_transitions_write``. Transitions are diagnostics, not
money: unlike usage (gateway/metering/journal.py) nothing is spooled to disk. A failed write
is retried with a growing delay, the buffer is bounded (the oldest rows are dropped
first, with a warning), and what is left at shutdown gets one last synchronous try.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from asgiref.sync import sync_to_async

from accounts.health.machine import Transition
from accounts.infra.batching import BackgroundFlush, write_or_requeue

logger = logging.getLogger(__name__)

Writer = Callable[[Sequence[Transition]], object]


def _default_writer(rows: Sequence[Transition]) -> object:
    from accounts.services import account_transitions_write

    return account_transitions_write(rows)


class TransitionLog:
    """Buffers :class:`Transition` records and writes them in batches off the request path."""

    def __init__(self, *, interval: float = 1.0, writer: Writer = _default_writer, max_pending: int = 10_000) -> None:
        self._buffer: list[Transition] = []
        self._writer = writer
        self._max_pending = max_pending
        self._flusher = BackgroundFlush(
            self._write,
            pending=lambda: bool(self._buffer),
            what="health transitions",
            linger=interval,
            min_backoff=interval,
            max_backoff=30.0,
            log=logger,
        )
        self.written = 0
        self.dropped = 0

    def add(self, transition: Transition) -> None:
        """Queue one transition. Never blocks, never raises; starts the writer in a running loop."""
        self._buffer.append(transition)
        if len(self._buffer) > self._max_pending:
            excess = len(self._buffer) - self._max_pending
            del self._buffer[:excess]
            self.dropped += excess
            logger.warning("transition log full: dropped the %d oldest transitions", excess)
        self._flusher.kick()

    def pending(self) -> int:
        return len(self._buffer)

    async def _write(self) -> None:
        batch, self._buffer = self._buffer, []
        if not batch:
            return
        self.written += await write_or_requeue(self._buffer, batch, sync_to_async(self._writer, thread_sensitive=False))

    async def aclose(self) -> None:
        """Stop the background task and write what is left (one try)."""
        await self._flusher.stop()
        if self._buffer:
            await sync_to_async(self.flush_sync, thread_sensitive=False)()

    def flush_sync(self) -> None:
        batch, self._buffer = self._buffer, []
        if not batch:
            return
        try:
            self._writer(batch)
            self.written += len(batch)
        except Exception:
            self.dropped += len(batch)
            logger.warning("writing %d health transitions at shutdown failed; dropped", len(batch), exc_info=True)
