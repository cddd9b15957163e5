"""Process-wide singletons of the data plane, created lazily inside the event loop.

Daphne sends no ASGI lifespan events, so nothing here may depend on a start-up hook:
the first request builds the runtime, and an ``atexit`` hook writes pending usage.
Under uvicorn the lifespan shutdown closes things in order.
"""

from __future__ import annotations

import asyncio
import atexit
import time
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings

from gateway.metering import UsageMeter
from gateway.state import ConfigState
from gateway.upstream import UpstreamClient

Send = Callable[[dict[str, Any]], Awaitable[None]]

KEEPALIVE_FRAME = b": keep-alive\n\n"


class KeepAlive:
    """One ticker for all open streams: sends an SSE comment to streams idle too long."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._streams: dict[int, list[Any]] = {}
        self._task: asyncio.Task[None] | None = None

    def register(self, send: Send) -> list[Any]:
        """Track a stream; returns its mutable ``[send, last_send_time]`` entry."""
        entry: list[Any] = [send, time.monotonic()]
        self._streams[id(entry)] = entry
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return entry

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
                    except Exception:
                        self.unregister(entry)


class Runtime:
    def __init__(self) -> None:
        self.redis: Any = None
        if settings.REDIS_URL:
            import redis.asyncio as aioredis

            self.redis = aioredis.Redis.from_url(settings.REDIS_URL)
        self.config = ConfigState(self._token_source())
        self.upstream = UpstreamClient(
            transport=settings.GATEWAY_UPSTREAM_TRANSPORT,
            connect_timeout=settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT,
            read_timeout=settings.GATEWAY_UPSTREAM_READ_TIMEOUT,
            max_connections=settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS,
        )
        self.meter = UsageMeter(settings.DATA_DIR / "usage-spool", interval=settings.GATEWAY_USAGE_FLUSH_SECONDS)
        self.keepalive = KeepAlive(settings.GATEWAY_SSE_KEEPALIVE_SECONDS)
        atexit.register(self.meter.flush_sync)

    def _token_source(self) -> Callable[[], Awaitable[object]]:
        from gateway import notify

        if self.redis is not None:
            redis = self.redis

            async def redis_token() -> object:
                return await notify.config_token_async(redis)

            return redis_token

        path = str(notify.config_gen_path())

        async def file_token() -> object:
            return notify.file_token(path)

        return file_token

    async def aclose(self) -> None:
        await self.meter.aclose()
        await self.upstream.aclose()
        if self.redis is not None:
            await self.redis.aclose()


_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        _runtime = Runtime()
    return _runtime


async def shutdown_runtime() -> None:
    global _runtime
    if _runtime is not None:
        await _runtime.aclose()
        _runtime = None
