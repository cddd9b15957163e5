"""Keep-alive comments for idle streams: one ticker for all of a process's open streams."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

KEEPALIVE_FRAME = b": keep-alive\n\n"


class KeepAlive:
    """One ticker for all open streams: sends an SSE comment to streams idle too long."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._streams: dict[int, list[Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def register(self, entry: list[Any]) -> None:
        """Track a stream's mutable ``[send, last_send_time]`` entry (the relay updates the time).

        After :meth:`aclose` (a stream still starting at shutdown) nothing is ticked.
        """
        if self._closed:
            return
        self._streams[id(entry)] = entry
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def unregister(self, entry: list[Any]) -> None:
        self._streams.pop(id(entry), None)

    async def _run(self) -> None:
        tick = min(self.interval / 2, 1.0)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for entry in list(self._streams.values()):
                if now - entry[1] >= self.interval:
                    entry[1] = now
                    try:
                        # Safe to interleave: the relay only ever sends whole frames.
                        await entry[0]({"type": "http.response.body", "body": KEEPALIVE_FRAME, "more_body": True})
                    except Exception:  # the stream's own task notices the broken client
                        self.unregister(entry)

    async def aclose(self) -> None:
        """Stop the ticker (at shutdown; open streams are being closed by their own tasks)."""
        self._closed = True
        task, self._task = self._task, None
        self._streams.clear()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
