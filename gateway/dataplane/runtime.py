"""The data plane's process state: one :class:`Runtime` per serving process.

The ASGI app owns it (:class:`gateway.dataplane.app.GatewayApp`): it is built and
started at lifespan start-up and closed at lifespan shutdown. Daphne sends no lifespan
events: there the first request starts it and Twisted's "before shutdown" trigger
closes it. Constructing a Runtime starts
nothing: no task, no process, no global setting.

Embedded mode (no ``REDIS_URL``) keeps limits, health and stickiness in process and
appends usage to a journal on disk; with Redis they are shared by every replica, and
usage goes through a Redis stream. Either way a supervised child process
(:mod:`gateway.metering.writer`) writes usage to the database, off this process's GIL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from cachetools import TTLCache
from django.conf import settings
from prometheus_client.multiprocess import mark_process_dead

from accounts.health.machine import Event, Transition
from accounts.health.probing import PROBE_CONCURRENCY, Prober
from accounts.health.store import health_store_from_settings
from accounts.health.transitions import TransitionLog
from accounts.routing.selection import Selector
from accounts.routing.stickiness import LocalStickyStore, RedisStickyStore
from accounts.upstream.account import AccountInfo
from accounts.upstream.client import UpstreamClient
from accounts.upstream.timers import CoarseTimers
from gateway.conf.db import drop_broken_connections
from gateway.conf.hot import hot
from gateway.config import notify
from gateway.config.snapshot import Snapshot
from gateway.config.state import ConfigState, DatabaseSource
from gateway.dataplane.disconnect import WatchStarter
from gateway.dataplane.keepalive import KeepAlive
from gateway.dataplane.live import LiveFeed
from gateway.dataplane.offload import Offload
from gateway.dataplane.outages import REDIS_ERRORS, reason
from gateway.dataplane.readiness import Readiness
from gateway.limits.engine import Decision, LocalLimiter, Scope
from gateway.limits.persistence import budget_spent_many, record_alert_retrying
from gateway.limits.redis_backend import RedisLimiter, redis_client
from gateway.limits.seeding import BatchSeed
from gateway.metering.backlog import journal_backlog, stream_backlog
from gateway.metering.journal import JournalWriter
from gateway.metering.stream import RedisUsageSink
from gateway.metering.writer import UsageWriterProcess, journal_dir, spool_dir
from gateway.observability import tracing
from gateway.observability.exposition import multiprocess_dir
from gateway.observability.logs import AccessLog, access
from gateway.observability.metrics import Metrics, Recorder, metrics_families, token_version
from gateway.observability.sampler import Sampler, Sources

if TYPE_CHECKING:
    from gateway.dataplane.exchange import Exchange

logger = logging.getLogger(__name__)
health_logger = logging.getLogger("gateway.health")

# While a worker thread computes (a snapshot load, a budget seed), each time the busy
# event loop lets go of the GIL (its I/O poll) the worker keeps it until the loop thread
# has waited a switch interval: a shorter interval means shorter stalls of the loop
# (median 4.1 ms against 8.5 ms at the default 5 ms, bench/gil_switch.py on a loaded
# 2-CPU machine). Set once per process, when it starts serving (Runtime.start).
GIL_SWITCH_INTERVAL = 0.001
# Probes: a probe is one short request; an upstream that takes longer is failing anyway.
PROBE_CONNECT_TIMEOUT = 5.0
PROBE_READ_TIMEOUT = 20.0

# GET /v1/usage: how long a key's figures (two aggregate queries) are served from memory,
# and for how many keys and windows at most (the oldest go first past it).
USAGE_CACHE_SECONDS = 5.0
USAGE_CACHE_ENTRIES = 10_000

# While Redis is down, how often it is pinged (and how long a ping may take) to see it back.
REDIS_CHECK_SECONDS = 1.0


def close_connections() -> None:
    """Close this thread's database connections (a reload's own thread, as it ends)."""
    from django.db import connections

    connections.close_all()


class Runtime:
    """Everything a serving process holds between requests (see the module docstring)."""

    def __init__(self) -> None:
        # Metrics (gateway/observability/): the per-request recorder and the gauges' sampler.
        self.metrics: Metrics | None = metrics_families() if settings.GATEWAY_METRICS else None
        self.recorder = Recorder(self.metrics) if self.metrics is not None else None
        self.sampler: Sampler | None = None
        self.access_log = AccessLog()  # the access lines, written in batches (flushed at close)
        self._tracing = False  # this runtime turned tracing on (and turns it off)
        # Each dependency's state, reported by the parts that use it (readiness, logged once).
        self.readiness = Readiness()
        self.redis: Any = redis_client(settings.REDIS_URL) if settings.REDIS_URL else None
        # The deadlines of every upstream call (reads, the attempt's total and idle), behind one
        # loop timer (accounts/upstream/timers.py).
        self.timers = CoarseTimers()
        self.upstream = UpstreamClient(
            transport=settings.GATEWAY_UPSTREAM_TRANSPORT,
            connect_timeout=settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT,
            read_timeout=settings.GATEWAY_UPSTREAM_READ_TIMEOUT,
            max_connections=settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS,
            timers=self.timers,
        )
        self.keepalive = KeepAlive(settings.GATEWAY_SSE_KEEPALIVE_SECONDS)
        self.watches = WatchStarter()  # starts ClientWatch's watchers (gateway/dataplane/disconnect.py)
        self.live = LiveFeed(self.redis)  # finished requests for the console's live view
        self.usage_cache: TTLCache[tuple[int, int], tuple[dict[str, Any], dict[str, Any]]] = TTLCache(
            maxsize=USAGE_CACHE_ENTRIES, ttl=USAGE_CACHE_SECONDS
        )
        self.offload = Offload()  # large bodies' parsing and serializing, off the event loop
        self.transitions = TransitionLog()
        self.health = health_store_from_settings(self.redis, self._on_transition)
        self.selector = Selector(self.health)
        # Probes run inside this process (no Celery needed), with short timeouts of their own.
        self.probe_client = UpstreamClient(
            transport=settings.GATEWAY_UPSTREAM_TRANSPORT,
            connect_timeout=PROBE_CONNECT_TIMEOUT,
            read_timeout=PROBE_READ_TIMEOUT,
            max_connections=PROBE_CONCURRENCY,
        )
        self.prober = Prober(self.health, self.probe_client, self._probe_targets)
        self.writer: UsageWriterProcess | None = None
        # Background tasks this runtime started (budget alerts): closed with it.
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False
        self._closed = False
        self._watching_redis = False
        # The change token this process last saw; with Redis, every admission refreshes it.
        self.token: object = None
        seed = BatchSeed(budget_spent_many)
        self.meter: JournalWriter | RedisUsageSink
        self.sticky: LocalStickyStore
        self.limiter: LocalLimiter | RedisLimiter
        token_source: Callable[[], Awaitable[object]]
        if self.redis is not None:
            self.limiter = RedisLimiter(
                self.redis,
                seed=seed,
                on_alert=self._on_alert,
                on_round_trip=self.recorder.round_trip if self.recorder is not None else None,
            )
            # Bindings ride on admissions: no round trip of their own.
            self.sticky = RedisStickyStore(self.redis, carry=self.limiter.carry)
            self.meter = RedisUsageSink(
                self.redis,
                interval=settings.GATEWAY_USAGE_FLUSH_SECONDS,
                url=settings.REDIS_URL,
                spool_dir=spool_dir(),
            )
            token_source = self._last_token
        else:
            self.sticky = LocalStickyStore()
            self.limiter = LocalLimiter(seed=seed, on_alert=self._on_alert)
            self.meter = JournalWriter(
                journal_dir(),
                max_buffer=settings.GATEWAY_USAGE_BUFFER_BYTES,
                on_state=self._state_reporter("journal"),
            )
            path = str(notify.config_gen_path())

            async def file_token() -> object:
                return notify.file_token(path)

            token_source = file_token
        self.config = ConfigState(
            token_source,
            # Each worker thread first drops its connection if a database restart broke it.
            DatabaseSource(before=drop_broken_connections, after=close_connections),
            max_age=settings.GATEWAY_SNAPSHOT_MAX_AGE,
            key_cache_size=settings.GATEWAY_KEY_CACHE_SIZE,
            on_reload=self._on_reload,
            on_state=self._state_reporter("database"),
            # No answer within the connect plus statement timeouts: a silent database.
            abandon_after=settings.GATEWAY_DB_CONNECT_TIMEOUT + (settings.GATEWAY_DB_STATEMENT_TIMEOUT or 30.0),
        )

    async def _last_token(self) -> object:
        return self.token

    async def fresh_token(self) -> object:
        """Read the change token now (endpoints that make no admission)."""
        if self.redis is not None:
            self.token = await notify.config_token_async(self.redis)
        return self.token

    async def admit(
        self, scopes: Sequence[Scope], *, tokens: int, micros: int, now: float, sticky_keys: Sequence[str] = ()
    ) -> Decision:
        """The request's admission (its one Redis round trip, with Redis).

        With Redis the bindings of ``sticky_keys`` (the request's prompt-cache keys, one per
        pool it may go to) that this process has not confirmed lately are read in the same
        script call, so dispatch finds them locally.
        """
        limiter, sticky = self.limiter, self.sticky
        if not (isinstance(limiter, RedisLimiter) and isinstance(sticky, RedisStickyStore) and sticky_keys):
            return await limiter.admit(scopes, tokens=tokens, micros=micros, now=now)
        stale = sticky.stale(sticky_keys)
        reads = [sticky.redis_key(key) for key in stale]
        decision = await limiter.admit(scopes, tokens=tokens, micros=micros, now=now, reads=reads)
        for key, raw in zip(stale, decision.reads, strict=True):
            sticky.learn(key, raw)
        return decision

    async def report_health(self, account_id: int, event: Event) -> None:
        """What a tenant request's attempt showed about an account: applied to its health, and
        a probe asked for when the event is evidence that needs confirming (a 401/403...)."""
        await self.health.report(account_id, event)
        self.prober.consider(account_id, event)

    async def _probe_targets(self) -> list[AccountInfo]:
        """The accounts of the current snapshot, each once (what the prober may probe)."""
        snapshot = await self.config.current()
        unique = {account.account_id: account for accounts in snapshot.targets.values() for account in accounts}
        return list(unique.values())

    def _on_reload(self, snapshot: Snapshot) -> None:
        self.health.apply_resets(snapshot.health_resets)
        if self.metrics is not None:
            self.metrics.config_reloads.inc()

    def _on_transition(self, transition: Transition) -> None:
        """An account's health changed: recorded (batched), counted and logged."""
        self.transitions.add(transition)
        health_logger.info(
            "account %d: %s -> %s (%s)",
            transition.account_id,
            transition.from_state,
            transition.to_state,
            transition.reason,
            extra={"account_id": transition.account_id, "to_state": str(transition.to_state)},
        )
        if self.metrics is not None:
            self.metrics.transitions.labels(str(transition.account_id), str(transition.to_state)).inc()

    def observe(self, ex: Exchange, route: str, method: str, path: str, cost: Decimal | None, now: float) -> None:
        """A finished request: counted in the metrics and logged (its access line)."""
        if self.recorder is not None:
            self.recorder.request(ex, route, cost, now)
        if hot.GATEWAY_ACCESS_LOG:
            access(ex, method, path, now, tracing.trace_id(), self.access_log)

    async def usage_backlog(self) -> int:
        """Usage records waiting for the usage writer (gateway/metering/backlog.py), plus those
        still in this process's memory."""
        if self.redis is not None:
            waiting = await stream_backlog(self.redis)
        else:
            waiting = await asyncio.to_thread(journal_backlog, journal_dir())
        return waiting + self.meter.pending()

    async def budgets_remaining(self) -> dict[int, float]:
        """USD left in the current window of each tenant with a money budget that the recorder
        saw (tenant labels on; else nothing), read from the limiter like ``/v1/usage`` does."""
        if self.recorder is None or not self.recorder.budgeted:
            return {}
        now = time.time()
        scopes = [limits.scope(now) for limits in list(self.recorder.budgeted.values())]
        reports = await self.limiter.peek(scopes, now=now)
        remaining: dict[int, float] = {}
        for scope, report in zip(scopes, reports, strict=True):
            budget: Any = report.get("budget")
            if budget and "usd" in budget:
                remaining[scope.id] = float(budget["usd"]["remaining"])
        return remaining

    def writer_up(self) -> bool:
        """The usage writer child runs (False when this process runs none)."""
        return self.writer is not None and not self.readiness.is_down("usage_writer")

    def _sampler(self, metrics: Metrics) -> Sampler:
        def accounts() -> list[int]:
            snapshot = self.config.latest
            if snapshot is None:
                return []
            return list({a.account_id for accounts in snapshot.targets.values() for a in accounts})

        def snapshot() -> tuple[float, float] | None:
            latest = self.config.latest
            return None if latest is None else (token_version(latest.token), latest.built_at)

        sources = Sources(
            health=self.health.states,
            accounts=accounts,
            down=lambda: set(self.readiness.report()["down"]),  # type: ignore[call-overload]
            writer_up=self.writer_up,
            pending=self.meter.pending,
            backlog=self.usage_backlog,
            snapshot=snapshot,
            budgets=self.budgets_remaining,
        )
        return Sampler(metrics, sources, settings.GATEWAY_METRICS_SAMPLE_SECONDS)

    def _state_reporter(self, name: str) -> Callable[[str | None], None]:
        """A callback for a part that reports ``reason`` when ``name`` fails and None when it recovers."""

        def report(reason: str | None) -> None:
            if reason is None:
                self.readiness.up(name)
            else:
                self.readiness.down(name, reason)

        return report

    def dependency_failed(self, name: str, why: str) -> None:
        """A request found ``name`` unavailable: readiness reports it (logged once).

        For Redis, one background task pings it until it answers, then reports it back up.
        (The database's state is reported by the parts that use it: ``/v1/usage``.)
        """
        self.readiness.down(name, why)
        if name == "redis" and self.redis is not None and not self._watching_redis and not self._closed:
            self._watching_redis = True
            self.spawn(self._watch_redis())

    async def _watch_redis(self) -> None:
        try:
            while not await self.check_redis():
                await asyncio.sleep(REDIS_CHECK_SECONDS)
        finally:
            self._watching_redis = False

    async def check_redis(self) -> bool:
        """Ping Redis (if this process uses it) and report the answer to readiness."""
        if self.redis is None:
            return True
        try:
            await asyncio.wait_for(self.redis.ping(), REDIS_CHECK_SECONDS)
        except REDIS_ERRORS as exc:
            self.readiness.down("redis", reason(exc))
            return False
        except TimeoutError:  # no answer within REDIS_CHECK_SECONDS
            self.readiness.down("redis", "TimeoutError")
            return False
        self.readiness.up("redis")
        return True

    def _on_alert(self, scope: Scope, kind: str, spent_tokens: int, spent_micros: int, window_start: int) -> None:
        # Runs on the event loop: the database work goes to a task (and a thread).
        self.spawn(record_alert_retrying(scope, kind, spent_tokens, spent_micros, window_start))

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run ``work`` in the background; closed with the runtime, its failure logged."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task failed", exc_info=task.exception())

    async def start(self) -> None:
        """Start background work once (lifespan start-up, or the first request under Daphne)."""
        if self._started:
            return
        self._started = True
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self.live.start()
        await self.health.start()
        self.prober.start()
        if settings.GATEWAY_USAGE_DRAINER:
            self.writer = UsageWriterProcess(on_state=self._state_reporter("usage_writer"))
            await self.writer.start()
        if self.metrics is not None:
            self.sampler = self._sampler(self.metrics)
            self.sampler.start()
        if settings.OTEL_EXPORTER_OTLP_ENDPOINT and not tracing.enabled():
            tracing.configure(settings.OTEL_EXPORTER_OTLP_ENDPOINT, settings.OTEL_SERVICE_NAME)
            self._tracing = True
        logger.info("data plane started (pid %d)", os.getpid())

    async def aclose(self) -> None:
        """Close everything in order: the meter's last records reach the journal or the stream
        before the writer's last pass. Each step's failure is logged, and the next runs."""
        if self._closed:
            return
        self._closed = True
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [("usage meter", self.meter.aclose)]
        if self.sampler is not None:
            steps.insert(0, ("metrics sampler", self.sampler.aclose))
        if self.writer is not None:
            steps.append(("usage writer", self.writer.stop))
        steps += [
            ("keep-alive ticker", self.keepalive.aclose),
            ("client watch ticker", self.watches.aclose),
            ("live feed", self.live.aclose),
            ("config snapshot", self.config.aclose),
            ("background tasks", self._cancel_tasks),
            ("account prober", self.prober.aclose),
            ("rate limiter", self.limiter.aclose),
            ("health transitions", self.transitions.aclose),
            ("sticky bindings", self.sticky.aclose),
            ("health store", self.health.aclose),
            ("upstream client", self.upstream.aclose),
            ("probe client", self.probe_client.aclose),
        ]
        if self.redis is not None:
            steps.append(("Redis client", self.redis.aclose))
        for name, step in steps:
            try:
                await step()
            except Exception:
                logger.exception("closing the %s failed", name)
        self.access_log.flush()  # the last access lines, before the "stopped" line
        if self.recorder is not None:
            self.recorder.flush()  # before this process's values are marked dead or exported
        if self._tracing:
            tracing.shutdown()  # exports the spans still batched
        if multiprocess_dir():
            mark_process_dead(os.getpid())  # this process's live gauges leave the sums
        logger.info("data plane stopped (pid %d)", os.getpid())

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        if tasks:
            # Budget alerts still being recorded (retrying through a database outage).
            logger.warning("%d background tasks cancelled at shutdown: %s", len(tasks), [t.get_coro() for t in tasks])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # a failure was logged by _done
