"""Coarse timers: many deadlines that are almost always cancelled, behind one event-loop timer.

Every upstream call arms deadlines it nearly never reaches: the wait for the answer's head and
for its body (accounts/upstream/transport.py) and the attempt's total and idle deadline
(gateway/dataplane/dispatch.py ``Deadline``). Under uvloop, arming and cancelling a timer
(``loop.call_later`` then ``cancel``) costs ~2.2 µs, a libuv timer handle made and closed
each time; three a request were ~7 µs of a serving process's CPU. :class:`CoarseTimers` keeps
them in buckets of ``resolution`` seconds, behind one loop timer for the earliest bucket:
arming is a dict insert into the bucket (a heap push when the bucket is new), cancelling a
dict delete, ~0.3 µs together (``python -m bench.timers_micro``).

The price is precision: a timer fires up to ``resolution`` seconds late (never early). The
deadlines it serves are seconds to minutes long; the default 0.05 s is below what anyone
could tell. Callbacks run in the loop's thread, from the loop timer's callback, in the
order of their buckets; one that raises is reported to the loop's exception handler and the
others still run.

One instance serves one event loop at a time (the loop passed to :meth:`CoarseTimers.call_at`);
given another loop (a new ``asyncio.run`` in tests), it forgets the timers of the old one.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable
from typing import Any

DEFAULT_RESOLUTION = 0.05


class CoarseTimer:
    """One armed timer; :meth:`cancel` it when it is no longer needed (idempotent)."""

    __slots__ = ("args", "bucket", "callback", "owner", "when")

    def __init__(
        self, owner: CoarseTimers, bucket: int, when: float, callback: Callable[..., object], args: tuple[Any, ...]
    ) -> None:
        self.owner = owner
        self.bucket = bucket
        self.when = when
        self.callback = callback
        self.args = args

    def cancel(self) -> None:
        buckets = self.owner._buckets
        bucket = buckets.get(self.bucket)
        if bucket is not None and self in bucket:
            del bucket[self]
            if not bucket:  # dropped, not kept empty: an emptied dict keeps its table's memory
                del buckets[self.bucket]


class CoarseTimers:
    """Timers in ``resolution``-second buckets behind one loop timer (see the module docstring)."""

    def __init__(self, resolution: float = DEFAULT_RESOLUTION) -> None:
        self.resolution = resolution
        self._buckets: dict[int, dict[CoarseTimer, None]] = {}
        # Bucket numbers to wake up for, each once (``_queued``); a bucket emptied by cancels
        # stays here until its time, so the heap holds at most the longest delay / resolution.
        self._heap: list[int] = []
        self._queued: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0  # the bucket ``_handle`` fires for

    def call_at(
        self, loop: asyncio.AbstractEventLoop, when: float, callback: Callable[..., object], *args: Any
    ) -> CoarseTimer:
        """Call ``callback(*args)`` at ``when`` (``loop.time()`` clock) or up to ``resolution`` later."""
        if loop is not self._loop:
            self._reset(loop)
        number = int(when / self.resolution) + 1
        timer = CoarseTimer(self, number, when, callback, args)
        bucket = self._buckets.get(number)
        if bucket is None:
            bucket = self._buckets[number] = {}
            if number not in self._queued:
                self._queued.add(number)
                heapq.heappush(self._heap, number)
            if self._handle is None or number < self._due:
                self._schedule(number)
        bucket[timer] = None
        return timer

    def __len__(self) -> int:
        """Timers armed and not cancelled."""
        return sum(len(bucket) for bucket in self._buckets.values())

    def _reset(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._handle is not None and self._loop is not None and not self._loop.is_closed():
            self._handle.cancel()
        self._handle = None
        self._buckets.clear()
        self._heap.clear()
        self._queued.clear()
        self._loop = loop

    def _schedule(self, number: int) -> None:
        assert self._loop is not None
        if self._handle is not None:
            self._handle.cancel()
        self._due = number
        self._handle = self._loop.call_at(number * self.resolution, self._fire)

    def _fire(self) -> None:
        loop = self._loop
        assert loop is not None
        self._handle = None
        now = loop.time()
        heap = self._heap
        while heap and heap[0] * self.resolution <= now:
            number = heapq.heappop(heap)
            self._queued.discard(number)
            # Taken out one at a time, the bucket still registered: a timer that an earlier
            # callback of this bucket cancelled is gone from it and never fires.
            bucket = self._buckets.get(number)
            while bucket:
                timer = next(iter(bucket))
                del bucket[timer]
                try:
                    timer.callback(*timer.args)
                except Exception as exc:
                    loop.call_exception_handler(
                        {"message": "a coarse timer's callback failed", "exception": exc, "timer": timer}
                    )
            self._buckets.pop(number, None)
        # Buckets emptied by cancels need no wake-up: skip them.
        while heap and heap[0] not in self._buckets:
            self._queued.discard(heapq.heappop(heap))
        # A callback that armed a timer while ``_handle`` was None scheduled the loop timer for
        # its own bucket, which may be later than one already queued: wake for the earliest.
        if heap and (self._handle is None or heap[0] < self._due):
            self._schedule(heap[0])
