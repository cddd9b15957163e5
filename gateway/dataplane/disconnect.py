"""Watching the client while its request is served: a client that leaves is noticed at once.

From the end of admission until the answer is complete, :class:`ClientWatch` reads the
client's channel (ASGI ``receive``): an ``http.disconnect`` cancels the serving task
wherever it waits (opening the upstream connection, waiting for a non-streamed answer,
holding a stream's first frames, relaying it). The upstream connection is then closed at
once, the concurrency slot and the reservation are settled by the caller's ``finally``, and
the usage record says ``client_disconnected`` with the usage seen (the stream path records
it itself; elsewhere the block raises :class:`ClientGone`).

Watching starts after admission, not before: a cancelled admission could leave its counts
applied with no ticket to settle them. A client that left during admission is seen by the
watcher's first read.

The watcher (a task reading ``receive``) starts :data:`WATCH_AFTER` seconds into the block,
not at its start: most answers are complete by then, and for them the task, its wake-up at
the answer's end and its cancel were pure cost (about 6 % of the gateway's throughput at 16
concurrent, measured with ``make bench``). The blocks still open that long are found by one
ticker for the whole process (:class:`WatchStarter`, every ``WATCH_AFTER / 2`` while any block
is open), not by a timer per request: a uvloop timer armed and cancelled is ~1.5-3 µs, a
dict entry added and removed ~0.1. A client that leaves is therefore noticed within
1.5 x :data:`WATCH_AFTER` of the block's start, or at once after that.

``http.disconnect`` also arrives once the answer is complete (uvicorn answers ``receive()``
that way): :meth:`ClientWatch.send` notes the last body message so that it is not taken
for a client leaving.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any

from gateway.dataplane.asgi_io import ClientGone, Receive, Send
from gateway.dataplane.exchange import Exchange

# Seconds into the block before the watcher starts (see the module docstring).
WATCH_AFTER = 0.02


class WatchStarter:
    """Starts the watcher of every open :class:`ClientWatch` block once it is ``delay`` seconds
    old, from one ticker (a task that runs while any block is open). One per process (the
    runtime's) or per test."""

    def __init__(self, delay: float = WATCH_AFTER) -> None:
        self.delay = delay
        # Open blocks not watched yet, by start time (insertion order): their due times.
        self._waiting: dict[ClientWatch, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def add(self, watch: ClientWatch, loop: asyncio.AbstractEventLoop) -> None:
        """Watch ``watch`` from ``delay`` seconds on (after :meth:`aclose`: never)."""
        if self._closed:
            return
        self._waiting[watch] = loop.time() + self.delay
        if self._task is None:
            self._task = loop.create_task(self._run(loop))

    def discard(self, watch: ClientWatch) -> None:
        self._waiting.pop(watch, None)

    async def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while self._waiting:
                await asyncio.sleep(self.delay / 2)
                now = loop.time()
                due: list[ClientWatch] = []
                for watch, at in self._waiting.items():
                    if at > now:
                        break  # the rest started later
                    due.append(watch)
                for watch in due:
                    del self._waiting[watch]
                    watch.start()
        finally:
            self._task = None

    async def aclose(self) -> None:
        """Stop the ticker (shutdown); blocks still open are no longer watched."""
        self._closed = True
        self._waiting.clear()
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class ClientWatch:
    """``async with ClientWatch(receive, send, ex, starter) as watch:`` serve, sending through
    ``watch.send``; ``starter`` (the runtime's :class:`WatchStarter`) starts the watcher."""

    def __init__(self, receive: Receive, send: Send, ex: Exchange, starter: WatchStarter) -> None:
        self._receive = receive
        self._send = send
        self._ex = ex
        self._starter = starter
        self._complete = False
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._complete = True
        await self._send(message)

    async def __aenter__(self) -> ClientWatch:
        loop = asyncio.get_running_loop()  # once: each call is a getpid system call
        self._task = asyncio.current_task(loop)
        self._starter.add(self, loop)
        return self

    def start(self) -> None:
        """Start reading the client (the starter calls it :data:`WATCH_AFTER` into the block)."""
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._starter.discard(self)
        if self._watcher is not None:
            self._watcher.cancel()
        task = self._task
        if not self._ex.client_gone or task is None:
            return
        if task.cancelling():  # our cancel: delivered (the error below) or swallowed on the way
            task.uncancel()
        if kind is asyncio.CancelledError:
            raise ClientGone from None

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] != "http.disconnect":
                continue
            if self._complete:  # the answer went out whole: nothing left to stop
                return
            self._ex.client_gone = True
            if self._task is not None:
                self._task.cancel()
            return
