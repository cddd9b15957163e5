"""Health transitions leave the request path here, in batches.

The health stores call :meth:`TransitionLog.add` (a list append); a background task
writes what accumulated every ``interval`` seconds through
``accounts.services.account_transitions_write``. Transitions are diagnostics, not
money: unlike usage (gateway/metering/journal.py) nothing is spooled to disk. A failed write
is retried with a growing delay, the buffer is bounded (the oldest rows are dropped
first, with a warning), and what is left at shutdown gets one last synchronous try.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from asgiref.sync import sync_to_async

from accounts.health.machine import Transition

logger = logging.getLogger(__name__)

Writer = Callable[[Sequence[Transition]], object]


def _default_writer(rows: Sequence[Transition]) -> object:
    from accounts.services import account_transitions_write

    return account_transitions_write(rows)


class TransitionLog:
    """Buffers :class:`Transition` records and writes them in batches off the request path."""

    def __init__(self, *, interval: float = 1.0, writer: Writer = _default_writer, max_pending: int = 10_000) -> None:
        self._buffer: list[Transition] = []
        self._interval = interval
        self._writer = writer
        self._max_pending = max_pending
        self._task: asyncio.Task[None] | None = None
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
        if self._task is None:
            with contextlib.suppress(RuntimeError):  # no running loop: flush_sync() writes it
                self._task = asyncio.get_running_loop().create_task(self._run())

    def pending(self) -> int:
        return len(self._buffer)

    async def _run(self) -> None:
        delay = self._interval
        while True:
            await asyncio.sleep(delay)
            if not self._buffer:
                continue
            batch, self._buffer = self._buffer, []
            try:
                await sync_to_async(self._writer, thread_sensitive=False)(batch)
            except asyncio.CancelledError:
                self._buffer[:0] = batch
                raise
            except Exception:
                self._buffer[:0] = batch
                delay = min(delay * 2, 30.0)
                logger.warning("writing %d health transitions failed; will retry", len(self._buffer), exc_info=True)
                continue
            self.written += len(batch)
            delay = self._interval

    async def aclose(self) -> None:
        """Stop the background task and write what is left (one try)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
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
