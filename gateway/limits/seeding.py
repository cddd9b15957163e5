"""Budget seeds in batches: one database query for every scope waiting on one.

A budget counter that does not exist yet (a fresh process, a new window, a Redis
restart) is seeded from the usage records (``gateway.limits.engine.Seeder``), and the admits
of that scope wait for it. Traffic spread over many keys meets many such first sights
at once; querying them one by one cost a worker-thread round trip and a query each,
and the thread hand-offs competed with the event loop for the GIL. Here the scopes
that ask while a query runs form the next query (a group commit): under load the
batch grows, and an idle gateway still answers a lone seed at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal

from gateway.limits.engine import Scope

logger = logging.getLogger(__name__)

WindowKey = tuple[str, int, int]  # scope name, window start, window end
Spent = tuple[int, Decimal]
Fetch = Callable[[str, Sequence[int], datetime, datetime], Awaitable[dict[int, Spent]]]


class BatchSeed:
    """``await seed(scope)`` -> (tokens, micro-USD) spent in its window; batched under the hood."""

    def __init__(self, fetch: Fetch, *, max_batch: int = 2000) -> None:
        self._fetch = fetch
        self._max_batch = max_batch
        self._waiting: dict[WindowKey, dict[int, list[asyncio.Future[tuple[int, int]]]]] = {}
        self._runner: asyncio.Task[None] | None = None
        self.queries = 0

    async def __call__(self, scope: Scope) -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, int]] = loop.create_future()
        window = (scope.name, scope.window_start, scope.window_end)
        self._waiting.setdefault(window, {}).setdefault(scope.id, []).append(future)
        if self._runner is None:
            self._runner = loop.create_task(self._run())
        return await future

    async def _run(self) -> None:
        from tenancy.pricing import usd_to_micros

        try:
            while self._waiting:
                window, ids = next(iter(self._waiting.items()))
                batch = dict(list(ids.items())[: self._max_batch])
                for scope_id in batch:
                    del ids[scope_id]
                if not ids:
                    del self._waiting[window]
                name, start, end = window
                try:
                    self.queries += 1
                    spent = await self._fetch(
                        name, list(batch), datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)
                    )
                except Exception as exc:
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                for scope_id, futures in batch.items():
                    tokens, cost = spent.get(scope_id, (0, Decimal(0)))
                    result = (int(tokens or 0), usd_to_micros(cost) if cost else 0)
                    for future in futures:
                        if not future.done():
                            future.set_result(result)
        finally:
            self._runner = None
