"""One background writer loop for everything written in batches off the request path.

Health records and probe-lock releases (accounts/health/store.py), account transitions
(accounts/health/transitions.py), usage events (gateway/metering/stream.py) and rate-limit
settlements (gateway/limits/redis_backend.py) are queued by their owners on the request path
and written by a :class:`BackgroundFlush`. The owner keeps its own queue (each has its own
shape) and gives the loop two callables: ``flush`` writes what is queued (and raises when it
could not: what failed stays queued, by the owner), ``pending`` says whether anything is.

Contract:

- :meth:`BackgroundFlush.kick` is O(1), never blocks and never raises: it starts the task on
  the running loop (none running: nothing happens; the owner's close path writes what is
  left) and wakes it.
- After a kick the loop waits ``linger`` seconds (to batch what arrives meanwhile), then
  flushes; it goes on while ``pending()`` is true and sleeps until the next kick otherwise.
- A failed flush is retried after ``min_backoff`` seconds, doubling up to ``max_backoff``.
  An outage is logged once, when it starts (WARNING, with its traceback), and once when a
  flush succeeds again; ``on_failure`` (async) runs after each failure (e.g. spill to disk).
- :meth:`stop` cancels the task and waits for it; the owner then writes what is left its own way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import TypeVar

from accounts.infra.redis import raise_if_cancelled

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(eq=False)
class BackgroundFlush:
    """The background task that writes an owner's queue in batches (see the module doc)."""

    flush: Callable[[], Awaitable[object]]
    _: KW_ONLY
    pending: Callable[[], bool]
    what: str
    linger: float = 0.0
    min_backoff: float = 0.05
    max_backoff: float = 10.0
    on_failure: Callable[[], Awaitable[object]] | None = None
    log: logging.Logger = logger
    failing: bool = field(default=False, init=False)  # in an outage: the last flush failed
    failures: int = field(default=0, init=False)  # failed flushes so far
    _wake: asyncio.Event | None = field(default=None, init=False, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    def kick(self) -> None:
        """Make sure what is queued will be written (starts the task on the running loop)."""
        if self._task is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
        assert self._wake is not None
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        assert self._wake is not None
        backoff = 0.0
        while True:
            raise_if_cancelled()  # a cancellation swallowed whole inside flush() still ends the loop
            if not backoff and not self.pending():
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(backoff or self.linger)
            try:
                await self.flush()
            except Exception:
                raise_if_cancelled()
                self.failures += 1
                if not self.failing:
                    self.failing = True
                    self.log.warning("writing %s failed; retrying with a growing backoff", self.what, exc_info=True)
                backoff = min(max(backoff * 2, self.min_backoff), self.max_backoff)
                if self.on_failure is not None:
                    await self.on_failure()
                continue
            if self.failing:
                self.failing = False
                self.log.warning("writing %s works again", self.what)
            backoff = 0.0

    async def stop(self) -> None:
        """Cancel the task and wait for it (what is queued stays with the owner)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def write_or_requeue(buffer: list[T], batch: list[T], write: Callable[[list[T]], Awaitable[object]]) -> int:
    """Write ``batch`` (taken from the head of ``buffer``); on any failure or cancellation put
    it back at the head, order kept, and re-raise. Returns how many were written."""
    try:
        await write(batch)
    except BaseException:
        buffer[:0] = batch
        raise
    return len(batch)
