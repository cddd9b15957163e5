"""Process-wide singletons of the data plane, created lazily inside the event loop.

Daphne sends no ASGI lifespan events, so nothing here may depend on a start-up hook:
the first request builds and starts the runtime, and an ``atexit`` hook writes pending
usage. Under uvicorn the lifespan shutdown closes things in order.

Embedded mode (no ``REDIS_URL``) keeps limits, health and stickiness in process and
appends usage to a journal on disk; with Redis they are shared by every replica, and
usage goes through a Redis stream. Either way a child process of each gateway process
(``gateway.metering.writer``) writes usage to the database, off this process's GIL.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import logging
import sys
import time
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.conf import settings

from accounts.health.store import health_store_from_settings
from accounts.health.transitions import TransitionLog
from accounts.routing.selection import Selector
from accounts.routing.stickiness import LocalStickyStore, RedisStickyStore
from accounts.upstream.client import UpstreamClient
from gateway.conf.db import db_call, drop_broken_connections
from gateway.config.snapshot import ConfigState, Snapshot, load_snapshot
from gateway.dataplane.keepalive import KeepAlive
from gateway.dataplane.readiness import Readiness
from gateway.limits.engine import LocalLimiter, Scope
from gateway.limits.seeding import BatchSeed
from gateway.metering.journal import JournalDrainer, JournalWriter, run_journal_drainer
from gateway.metering.writer import UsageWriterProcess, journal_dir, spool_dir

logger = logging.getLogger(__name__)


# A generation-2 threshold no snapshot build reaches (counted in generation-1 collections).
FULL_COLLECTION_HELD_OFF = 1_000_000


def _load_snapshot(token: object) -> Snapshot:
    """``gateway.config.snapshot.load_snapshot`` in a worker thread (see :func:`db_call`).

    With ``GATEWAY_GC_FREEZE``, the new snapshot (thousands of keys: ~100k objects) is
    frozen out of the cyclic collector's sight as soon as it is built: it lives until the
    next reload, and a full collection walking it stops the event loop for 20-100 ms
    (measured under load). Full collections are held off while it is being built, for the
    same reason. Objects still die by reference counting; snapshots hold no cycles.
    """
    drop_broken_connections()
    if not settings.GATEWAY_GC_FREEZE:
        return load_snapshot(token)
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], FULL_COLLECTION_HELD_OFF)
    try:
        snapshot = load_snapshot(token)
        gc.freeze()
        return snapshot
    finally:
        gc.set_threshold(*thresholds)


async def _budget_spent_many(
    scope: str, ids: Sequence[int], start: datetime, end: datetime
) -> dict[int, tuple[int, Decimal]]:
    """What the database says these scopes spent in their budget window (after a restart)."""
    from tenancy.selectors import budget_spent_many

    spent: dict[int, tuple[int, Decimal]] = await db_call(budget_spent_many)(scope, ids, start, end)
    return spent


# The usage drainer's XREADGROUP blocks this long; shutdown waits this long for its batch.
DRAINER_BLOCK_SECONDS = 1.0
DRAINER_STOP_SECONDS = 5.0

# An alert fires once per scope, window and kind: a failed write (a database outage, a
# locked SQLite file) is retried with backoff for this long rather than lost.
ALERT_RETRY_SECONDS = 600.0


def _record_alert(scope: Scope, kind: str, spent_tokens: int, spent_micros: int, window_start: int) -> None:
    """Record the alert; ``budget_alert_record`` queues its webhook delivery (once) when configured."""
    from tenancy.pricing import budget_window, micros_to_usd
    from tenancy.services.alerts import budget_alert_record

    start = datetime.fromtimestamp(window_start, UTC)
    end = datetime.fromtimestamp(scope.window_end, UTC) if scope.window_end else budget_window("month", start)[1]
    budget_alert_record(
        scope=scope.name,
        scope_id=scope.id,
        tenant_id=scope.tenant_id or scope.id,
        kind=kind,
        period_start=start,
        period_end=end,
        spent_usd=micros_to_usd(spent_micros),
        spent_tokens=spent_tokens,
        limit_usd=micros_to_usd(scope.budget_micros) if scope.budget_micros is not None else None,
        limit_tokens=scope.budget_tokens,
    )


async def _record_alert_retrying(*args: Any) -> None:
    """:func:`_record_alert`, retried while the database fails (it is idempotent)."""
    from django.db import DatabaseError

    record = db_call(_record_alert)
    deadline = time.monotonic() + ALERT_RETRY_SECONDS
    delay = 0.1
    while True:
        try:
            await record(*args)
            return
        except (DatabaseError, OSError):
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("recording a budget alert failed; retrying in %.1fs", delay, exc_info=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


class Runtime:
    def __init__(self) -> None:
        # The event loop thread hardly ever waits, so background writer threads (usage,
        # health transitions) only get the GIL when the switch interval forces a hand-over;
        # at the default 5 ms they fell behind under sustained load (docs/performance.md).
        sys.setswitchinterval(settings.GATEWAY_GIL_SWITCH_INTERVAL)
        # Each dependency's state, reported by the parts that use it (readiness, logged once).
        self.readiness = Readiness()
        self.redis: Any = None
        if settings.REDIS_URL:
            from gateway.limits.redis_backend import redis_client

            # A blocking pool: more concurrent commands than connections wait, not fail.
            self.redis = redis_client(settings.REDIS_URL)
        self.upstream = UpstreamClient(
            transport=settings.GATEWAY_UPSTREAM_TRANSPORT,
            connect_timeout=settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT,
            read_timeout=settings.GATEWAY_UPSTREAM_READ_TIMEOUT,
            max_connections=settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS,
        )
        self.keepalive = KeepAlive(settings.GATEWAY_SSE_KEEPALIVE_SECONDS)
        self.transitions = TransitionLog()
        self.health = health_store_from_settings(self.redis, self.transitions.add)
        self.selector = Selector(self.health)
        self._background: list[asyncio.Task[None]] = []
        self._started = False
        # Usage to the database: a child process (default), or a task here (drainer).
        self._writer_process: UsageWriterProcess | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._drainer_stop = asyncio.Event()
        # The change token this process last saw; with Redis, every admission refreshes it.
        self.token: object = None
        self.meter: Any
        self._seed = BatchSeed(_budget_spent_many)
        if self.redis is not None:
            from gateway.limits.redis_backend import RedisLimiter
            from gateway.metering.stream import RedisUsageSink

            self.sticky: LocalStickyStore = RedisStickyStore(self.redis)
            self.limiter: Any = RedisLimiter(self.redis, seed=self._seed, on_alert=self._on_alert)
            self.meter = RedisUsageSink(
                self.redis,
                interval=settings.GATEWAY_USAGE_FLUSH_SECONDS,
                url=settings.REDIS_URL,
                spool_dir=settings.DATA_DIR / "usage-spool",
            )
        else:
            from gateway.config import notify

            self.sticky = LocalStickyStore()
            self.limiter = LocalLimiter(seed=self._seed, on_alert=self._on_alert)
            self.meter = JournalWriter(journal_dir(), interval=settings.GATEWAY_USAGE_FLUSH_SECONDS)
            path = str(notify.config_gen_path())

            async def file_token() -> object:
                return notify.file_token(path)

        self.config = ConfigState(
            self._last_token if self.redis is not None else file_token,
            _load_snapshot,
            on_reload=self._on_reload,
            max_age=settings.GATEWAY_SNAPSHOT_MAX_AGE,
        )
        atexit.register(self._flush_at_exit)
        atexit.register(self.transitions.flush_sync)

    async def _last_token(self) -> object:
        return self.token

    async def fresh_token(self) -> object:
        """Read the change token now (endpoints that make no admission)."""
        from gateway.config import notify

        if self.redis is not None:
            self.token = await notify.config_token_async(self.redis)
        return self.token

    def _on_reload(self, snapshot: Snapshot) -> None:
        self.health.apply_resets(snapshot.health_resets)

    def _on_alert(self, scope: Scope, kind: str, spent_tokens: int, spent_micros: int, window_start: int) -> None:
        # Runs on the event loop: the database work goes to a thread.
        task = asyncio.get_running_loop().create_task(
            _record_alert_retrying(scope, kind, spent_tokens, spent_micros, window_start)
        )
        self._background.append(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._background.remove(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task failed", exc_info=task.exception())

    async def start(self) -> None:
        """Start background work once (first request, or lifespan start-up)."""
        if self._started:
            return
        self._started = True
        await self.health.start()
        if not settings.GATEWAY_USAGE_DRAINER:
            return
        if settings.GATEWAY_USAGE_WRITER == "process":
            self._writer_process = UsageWriterProcess()
            self._writer_process.start()
            return
        drain: Coroutine[Any, Any, None]
        if self.redis is not None:
            from gateway.metering.stream import run_drainer

            drain = run_drainer(self.redis, stop=self._drainer_stop, block_ms=int(DRAINER_BLOCK_SECONDS * 1000))
        else:
            drainer = JournalDrainer(journal_dir(), extra_dirs=[spool_dir()])
            drain = run_journal_drainer(drainer, stop=self._drainer_stop)
        self._drainer = asyncio.get_running_loop().create_task(drain)
        self._background.append(self._drainer)

    def _flush_at_exit(self) -> None:
        """``atexit``: hand over what the meter still holds (Daphne sends no lifespan shutdown)."""
        if self._drainer is not None and not self._drainer_stop.is_set() and self.meter.pending():
            # The event loop is gone but this process's drainer may still be blocked in
            # XREADGROUP: Redis would hand it the entries added now, and they would wait,
            # unacknowledged, for another replica to claim them (60 s). Let Redis time the
            # read out first.
            time.sleep(DRAINER_BLOCK_SECONDS + 0.2)
        if isinstance(self.meter, JournalWriter):
            self.meter.close()
        else:
            self.meter.flush_sync()
        if self._writer_process is not None:
            self._writer_process.stop()

    async def aclose(self) -> None:
        # The meter first: its last records must be out before the writer's last pass.
        await self.meter.aclose()
        if self._writer_process is not None:
            await asyncio.to_thread(self._writer_process.stop)
            self._writer_process = None
        if self._drainer is not None:
            # Let the drainer finish its batch: cancelled between its database write and the
            # XACK, it would leave entries pending until another replica claims them (60 s).
            self._drainer_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._drainer), DRAINER_STOP_SECONDS)
        for task in list(self._background):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.limiter.aclose()
        await self.transitions.aclose()
        await self.sticky.aclose()
        await self.health.aclose()
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
