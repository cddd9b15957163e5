"""The process's view of the configuration: the current snapshot, the keys, the change feed.

:class:`ConfigState` hands out the current :class:`~gateway.config.snapshot.Snapshot` and its
:class:`~gateway.config.keys.KeyDirectory`. When the change token of ``gateway.config.notify``
moves, it reads the change feed (``tenancy.models.ConfigChange``, the rows after the last one
it applied: a primary-key range) and drops just the keys and tenants named there; only a
change of prices, pools, accounts or routes rebuilds the (small) snapshot. So a change costs
work proportional to what changed, and a revoked key is refused on the very next request.

Reloads run in one background task, off the request path. A request that sees a new token
waits for that reload at most :data:`RELOAD_WAIT` seconds from the reload's start; past that,
or while the database fails (a retry after 0.5 s, doubling up to 30 s), requests are served
from the last good snapshot at once. The failure is reported to readiness as ``database``
(logged once) and cleared by the next reload that succeeds. The database calls themselves
are bounded by ``GATEWAY_DB_CONNECT_TIMEOUT`` and ``GATEWAY_DB_STATEMENT_TIMEOUT``
(PostgreSQL; SQLite: its 5 s busy timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from gateway.config.keys import KeyDirectory, PrefixSet
from gateway.config.snapshot import Snapshot, build_snapshot

logger = logging.getLogger(__name__)

# How long a request waits for a reload it found running (from the reload's start).
RELOAD_WAIT = 1.0
# A failed reload is retried after this long, doubling up to RELOAD_BACKOFF_MAX.
RELOAD_BACKOFF = 0.5
RELOAD_BACKOFF_MAX = 30.0
# A reload still running after this long (default; the runtime passes the database's connect
# plus statement timeouts) is abandoned: its thread may be stuck on a connection that a
# silent database never answers. The next request after the backoff starts another.
RELOAD_ABANDON = 35.0
# The membership set is loaded this long after the first snapshot, so that reading every
# prefix (a million: a second or two of a worker thread) does not slow the first requests.
MEMBERS_DELAY = 1.0
# Changes read at most per reload; more than that and every cached key is dropped instead.
FEED_LIMIT = 1000


class DatabaseSource:
    """The configuration as the selectors read it (each method blocking: a worker thread)."""

    def __init__(self, before: Callable[[], None] = lambda: None, after: Callable[[], None] = lambda: None) -> None:
        self._before = before  # e.g. drop this thread's broken connection first
        self.after_reload = after  # run at the end of a reload's own thread (close its connections)

    def snapshot(self, token: object) -> Snapshot:
        from accounts.selectors import accounts_for_snapshot, routes_for_snapshot
        from tenancy.selectors import prices_for_snapshot

        self._before()
        return build_snapshot(token, accounts_for_snapshot(), routes_for_snapshot(), prices_for_snapshot())

    def last_change(self) -> int:
        from tenancy.selectors import config_change_last

        self._before()
        return config_change_last()

    def changes(self, after: int, limit: int) -> list[dict[str, Any]]:
        from tenancy.selectors import config_changes_since

        self._before()
        return config_changes_since(after, limit)

    def keys(self, prefixes: list[str]) -> Mapping[str, Mapping[str, Any]]:
        from tenancy.selectors import apikeys_for_snapshot_by_prefix

        self._before()
        return apikeys_for_snapshot_by_prefix(prefixes)

    def prefixes(self) -> Iterable[str]:
        from tenancy.selectors import apikey_prefixes

        self._before()
        return apikey_prefixes()


class ConfigState:
    """See the module docstring.

    ``token_source`` is awaited once per request: an ``os.stat`` in embedded mode; with
    Redis it returns the last token seen (the limiter's admission script reads the real
    one in the same round trip). ``on_reload`` runs after every snapshot rebuild (e.g. to
    apply operator health resets); ``on_state`` gets None when the database answered and a
    reason when a reload failed or timed out (readiness).
    """

    def __init__(
        self,
        token_source: Callable[[], Awaitable[object]],
        source: Any = None,
        *,
        max_age: float,
        key_cache_size: int,
        on_reload: Callable[[Snapshot], None] | None = None,
        on_state: Callable[[str | None], None] | None = None,
        abandon_after: float = RELOAD_ABANDON,
    ) -> None:
        self._token_source = token_source
        self._source = source if source is not None else DatabaseSource()
        self._max_age = max_age
        self._abandon_after = abandon_after
        self._on_reload = on_reload
        self._on_state = on_state or (lambda reason: None)
        self.keys = KeyDirectory(self._source.keys, size=key_cache_size, timeout=abandon_after, on_state=self._on_state)
        self._snapshot: Snapshot | None = None
        self._last_change = 0
        self._first: asyncio.Lock | None = None
        self._reload: asyncio.Task[None] | None = None
        self._reload_started = 0.0
        self._retry_at = 0.0
        self._backoff = RELOAD_BACKOFF
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loading_members = False

    @property
    def latest(self) -> Snapshot | None:
        """The snapshot in force, without looking for a newer one (None before the first)."""
        return self._snapshot

    async def current(self) -> Snapshot:
        """The snapshot for the current token (see the module docstring for the waits)."""
        token = await self._token_source()
        snapshot = self._snapshot
        if snapshot is None:
            return await self._load_first(token)
        if snapshot.token == token:
            if time.monotonic() - snapshot.built_at > self._max_age:
                self._start(token, force=True)
            return snapshot
        return await self.reload(token)

    async def reload(self, token: object) -> Snapshot:
        """Follow ``token``: start a reload (unless one runs or the last failed lately) and
        wait for it within RELOAD_WAIT; the current snapshot either way."""
        if self._snapshot is None:
            return await self._load_first(token)
        task = self._start(token, force=False)
        if task is not None:
            left = self._reload_started + RELOAD_WAIT - time.monotonic()
            if left > 0:
                await asyncio.wait({task}, timeout=left)
                if not task.done():  # reported by the request that waited it out
                    self._on_state("configuration reload timed out")
        assert self._snapshot is not None
        return self._snapshot

    def _start(self, token: object, *, force: bool) -> asyncio.Task[None] | None:
        running = self._reload
        if running is not None and time.monotonic() - self._reload_started > self._abandon_after:
            logger.warning("configuration reload abandoned after %.0fs without an answer", self._abandon_after)
            self._reload = None
            self._fail(TimeoutError())
        if self._reload is None and time.monotonic() >= self._retry_at:
            self._reload_started = time.monotonic()
            self._reload = self._spawn(self._follow(token, force=force))
        return self._reload

    async def _load_first(self, token: object) -> Snapshot:
        """The first snapshot: every request waits for it (a failure is raised)."""
        if self._first is None:
            self._first = asyncio.Lock()
        async with self._first:
            if self._snapshot is None:
                last = await asyncio.to_thread(self._source.last_change)
                snapshot = await asyncio.to_thread(self._source.snapshot, token)
                self._last_change = last
                self._install(snapshot)
                self._spawn(self._load_members(delay=MEMBERS_DELAY))
            assert self._snapshot is not None
            return self._snapshot

    def _read(self, token: object, after: int, force: bool) -> tuple[list[dict[str, Any]], Snapshot | None]:
        """The feed after ``after``, and the rebuilt snapshot if something other than keys changed."""
        try:
            changes = self._source.changes(after, FEED_LIMIT + 1)
            rebuild = force or any(change["kind"] == "config" for change in changes)
            return changes, self._source.snapshot(token) if rebuild else None
        finally:
            getattr(self._source, "after_reload", lambda: None)()

    def _fail(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, RELOAD_BACKOFF_MAX)
        self._on_state(f"configuration reload failed: {type(exc).__name__}")

    async def _follow(self, token: object, *, force: bool) -> None:
        me = asyncio.current_task()
        try:
            # A thread of its own, not the shared pool: one stuck on a silent database is
            # abandoned (see RELOAD_ABANDON) without taking a pool thread with it.
            changes, snapshot = await _in_own_thread(self._read, token, self._last_change, force)
        except Exception as exc:
            if self._reload is me:
                self._reload = None
                self._fail(exc)
                logger.warning("configuration reload failed; serving the previous snapshot: %s", type(exc).__name__)
            return
        if self._reload is not me:  # abandoned meanwhile: a later reload applies the feed
            return
        self._reload = None
        self._backoff = RELOAD_BACKOFF
        self._on_state(None)
        if self.keys.members is None and not self._loading_members:  # it failed at start
            self._spawn(self._load_members())
        self._apply(changes)
        current = self._snapshot
        assert current is not None
        self._install(snapshot if snapshot is not None else dataclasses.replace(current, token=token))

    def _apply(self, changes: list[dict[str, Any]]) -> None:
        if not changes:
            return
        if len(changes) > FEED_LIMIT:  # too far behind: start over
            self.keys.clear()
            self.keys.members = None
            self._last_change = changes[-1]["id"]  # replaced below by a fresh read
            self._spawn(self._restart_feed())
            return
        self._last_change = changes[-1]["id"]
        self.keys.invalidate(
            (change["prefix"] for change in changes if change["kind"] == "key"),
            (change["tenant_id"] for change in changes if change["kind"] == "tenant"),
        )

    async def _restart_feed(self) -> None:
        self._last_change = await asyncio.to_thread(self._source.last_change)
        self.keys.clear()
        await self._load_members()

    def _install(self, snapshot: Snapshot) -> None:
        rebuilt = self._snapshot is None or snapshot.built_at != self._snapshot.built_at
        self._snapshot = snapshot
        if rebuilt and self._on_reload is not None:
            self._on_reload(snapshot)

    async def _load_members(self, delay: float = 0.0) -> None:
        """Every stored prefix, read once in the background (a million: a second or two)."""
        self._loading_members = True
        try:
            await asyncio.sleep(delay)
            members = await asyncio.to_thread(lambda: PrefixSet(self._source.prefixes()))
        finally:
            self._loading_members = False
        self.keys.set_members(members)
        logger.info("key membership loaded: %d prefixes", len(members))

    def _spawn(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("configuration task failed", exc_info=task.exception())

    async def aclose(self) -> None:
        """Cancel the reloads and loads in progress (at shutdown); their errors were logged."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _in_own_thread(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a new daemon thread; its result (or error) awaited here."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="config-reload", daemon=True).start()
    return await future
