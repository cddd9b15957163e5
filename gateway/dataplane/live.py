"""The live view's feed: finished requests pushed to the console's watchers (tenancy/console/live.py).

Contract: :meth:`LiveFeed.publish` is called once per finished request on the hot path and
costs one attribute read while nobody watches; while someone does, it appends a small line to
a bounded buffer (``MAX_LINES``; lines beyond it are dropped and counted: the live view is a
window, the usage records are the truth). One background task, owned by the runtime, sends
the buffered lines every ``FLUSH_SECONDS`` in one channel-layer message per tenant group plus
one to the operators' group, the lines already encoded as JSON text (``{"type": "live.lines",
"text": "[...]"}``: Channels' in-memory layer deep-copies every message it delivers, which for
a list of line dicts cost more than the request itself; a string is copied for nothing, and
the watcher's socket sends it as it is), and re-reads whether anyone watches: a live view open in this
process (``LocalWatchers``), or, with Redis, on any replica (``WATCH_KEY``, refreshed by the
watchers). The channel layer is Channels' own: Redis when ``REDIS_URL`` is set, in-memory
otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import orjson
from channels.layers import get_channel_layer

from accounts.infra.redis import raise_if_cancelled
from tenancy.live import GROUP_ALL, WATCH_KEY, LocalWatchers, tenant_group

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 0.25
MAX_LINES = 1000
# How often the Redis watch key is re-read (the local count is read at every flush).
WATCH_CHECK_SECONDS = 1.0


class LiveFeed:
    """Buffers finished requests for the live view and sends them in batches."""

    def __init__(self, redis: Any = None) -> None:
        self.redis = redis
        self.watching = False
        self.dropped = 0
        self._lines: deque[dict[str, Any]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._remote = False
        self._checked = 0.0

    def publish(self, event: dict[str, Any], key_prefix: str) -> None:
        """Note one finished request (a usage event) for the watchers, if there are any."""
        if not self.watching:
            return
        if len(self._lines) >= MAX_LINES:
            self.dropped += 1
            return
        self._lines.append(
            {
                "request_id": event["request_id"],
                "tenant_id": event["tenant_id"],
                "key": key_prefix,
                "model": event["model"],
                "status": event["status_code"],
                "outcome": event["outcome"],
                "tokens": event.get("total_tokens"),
                "latency_ms": round(event["latency_ms"], 1),
                "stream": event["stream"],
                "at": event["created_at"],  # a datetime: orjson writes it as isoformat() does
            }
        )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="live feed")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        layer = get_channel_layer()
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self._refresh_watching()
                if self._lines and layer is not None:
                    await self.flush(layer)
            except Exception:  # a Redis hiccup must not end the feed (a cancellation must)
                raise_if_cancelled()
                logger.warning("the live feed could not send", exc_info=True)
            raise_if_cancelled()  # also when a library swallowed it whole

    async def _refresh_watching(self) -> None:
        now = time.monotonic()
        if self.redis is not None and now - self._checked >= WATCH_CHECK_SECONDS:
            self._checked = now
            self._remote = bool(await self.redis.exists(WATCH_KEY))
        self.watching = LocalWatchers.count > 0 or self._remote
        if not self.watching:
            self._lines.clear()

    async def flush(self, layer: Any) -> None:
        """Send the buffered lines: each tenant's to its group, all of them to the operators'."""
        lines = list(self._lines)
        self._lines.clear()
        by_tenant: dict[int, list[dict[str, Any]]] = {}
        for line in lines:
            by_tenant.setdefault(line["tenant_id"], []).append(line)
        await layer.group_send(GROUP_ALL, {"type": "live.lines", "text": orjson.dumps(lines).decode()})
        for tenant_id, tenant_lines in by_tenant.items():
            text = orjson.dumps(tenant_lines).decode()
            await layer.group_send(tenant_group(tenant_id), {"type": "live.lines", "text": text})
