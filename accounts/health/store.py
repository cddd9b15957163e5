"""Where account health lives: in this process, or shared by every replica through Redis.

The data plane reads health on every pick, so reads never leave the process: both
stores answer :meth:`LocalHealthStore.admission` / ``usable`` / ``earliest_deadline``
from a dict. Events go in through ``await store.report(account_id, event)``.

:class:`LocalHealthStore` (embedded mode) is the authority itself: the event is applied
and its transition queued for the database (accounts/health/transitions.py).

:class:`RedisHealthStore` keeps the same dict as a *mirror* of Redis:

- ``report`` applies the event to the mirror at once (this replica stops using a
  rate-limited account immediately) and queues it for a background writer; nothing
  waits on Redis on the request path.
- The writer folds the queued events of each account into the shared record inside a
  ``WATCH``/``MULTI`` transaction, so concurrent replicas never lose each other's
  updates, and publishes the result. Transitions are computed there, against the
  shared record, so each one is logged exactly once whichever replica saw it.
- Every replica subscribes to the channel and replaces its mirror entry when a
  published record has a higher ``version``; on (re)subscribing and every
  ``resync_interval`` seconds it reloads every record, to survive missed messages.

Redis layout (``prefix``: ``GATEWAY_HEALTH_REDIS_PREFIX``, default ``gw:health``)::

    {prefix}:acct:{id}    hash: Health.to_wire() fields as strings ("" for None);
                          "until" is the deadline (epoch seconds)
    {prefix}:ids          set of account ids that have a hash (what a resync reads)
    {prefix}:seq          counter; INCR gives each write its version (monotonic per account)
    {prefix}:probe:{id}   string, SET NX PX: the half-open trial lock (value: owner token)
    channel {prefix}      PUBLISH of orjson(Health.to_wire()) after every write

Deadlines are wall-clock epoch seconds (``time.time()``): replicas on different hosts
must agree on them, so keep their clocks in sync (NTP); a skew of s seconds shifts
cooldowns by s. If Redis is unreachable the mirror keeps protecting this replica, the
writer retries with a growing delay, and a resync follows the reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from accounts.health.machine import Admission, Event, Health, HealthMachine, HealthPolicy, State, Transition
from accounts.infra.batching import BackgroundFlush
from accounts.infra.redis import raise_if_cancelled
from accounts.infra.redis import sync_client as redis_client_for

if TYPE_CHECKING:
    import redis as redis_sync
    import redis.asyncio as redis_async

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "gw:health"

Sink = Callable[[Transition], None]
Clock = Callable[[], float]

# Deletes the trial lock only if its owner still holds it (run through redis-py's register_script).
RELEASE_PROBE_LUA = (Path(__file__).parent / "release_probe.lua").read_text()


def _discard(_: Transition) -> None:
    pass


@dataclass(frozen=True, slots=True)
class Blocked:
    """Why a set of accounts cannot serve now (:meth:`LocalHealthStore.blocked`).

    Suggested answers when no account could be picked: ``cooling_until`` set and no
    circuit due sooner: 429 ``usage_limit_reached`` with ``Retry-After`` =
    ``ceil(cooling_until - now)``; only open circuits: 503 with ``Retry-After`` from
    ``open_until``; only disabled accounts: 503 ``no_accounts``.
    """

    cooling_until: float | None  # earliest end of a cooldown
    open_until: float | None  # earliest trial of an open circuit
    cooling: int
    open: int
    disabled: int


class LocalHealthStore:
    """Health of every account, held in this process (embedded mode, and tests).

    ``sink`` receives each transition (normally ``TransitionLog.add``). ``clock`` gives
    epoch seconds. Unknown accounts are HEALTHY.
    """

    def __init__(
        self,
        machine: HealthMachine | None = None,
        *,
        sink: Sink = _discard,
        clock: Clock = time.time,
    ) -> None:
        self.machine = machine or HealthMachine()
        self._sink = sink
        self._clock = clock
        self._states: dict[int, Health] = {}
        # Half-open trials and probes this process holds: account id -> lock expiry.
        self._trials: dict[int, float] = {}
        # True while an in-process prober runs (accounts/health/probing.py): it makes every
        # half-open trial, so no tenant request is one (a due trial reads as DENY).
        self.trials_by_prober = False

    # --- reads (hot path: dict lookups only) ----------------------------------------------

    def health(self, account_id: int) -> Health:
        return self._states.get(account_id) or Health(account_id)

    def admission(self, account_id: int, now: float | None = None) -> Admission:
        """ADMIT, DENY, or TRIAL when a half-open trial is due and nobody here holds it
        (DENY instead while a prober makes the trials)."""
        health = self._states.get(account_id)
        if health is None:
            return Admission.ADMIT
        now = self._clock() if now is None else now
        admission = health.admission(now)
        if admission is Admission.TRIAL and (self.trials_by_prober or self._trials.get(account_id, 0.0) > now):
            return Admission.DENY
        return admission

    def usable(self, account_id: int, now: float | None = None) -> bool:
        return self.admission(account_id, now) is not Admission.DENY

    def earliest_deadline(self, account_ids: Iterable[int], now: float | None = None) -> float | None:
        """The earliest time (epoch s) one of these accounts leaves COOLING or CIRCUIT_OPEN.

        None when none of them has such a deadline ahead (all usable, or all disabled).
        For the 429 ``Retry-After`` when every account is cooling down.
        """
        now = self._clock() if now is None else now
        best: float | None = None
        for account_id in account_ids:
            health = self._states.get(account_id)
            if health is None or health.until is None or health.until <= now:
                continue
            if health.state in (State.COOLING, State.CIRCUIT_OPEN) and (best is None or health.until < best):
                best = health.until
        return best

    def blocked(self, account_ids: Iterable[int], now: float | None = None) -> Blocked:
        """Counts and earliest deadlines of the accounts among ``account_ids`` that are not usable."""
        now = self._clock() if now is None else now
        cooling_until: float | None = None
        open_until: float | None = None
        cooling = opened = disabled = 0
        for account_id in account_ids:
            health = self._states.get(account_id)
            if health is None or self.admission(account_id, now) is not Admission.DENY:
                continue
            if health.state is State.COOLING and health.until is not None:
                cooling += 1
                cooling_until = health.until if cooling_until is None else min(cooling_until, health.until)
            elif health.state is State.CIRCUIT_OPEN and health.until is not None:
                opened += 1  # a due trial being made: "retry shortly" (Retry-After 1)
                until = max(health.until, now)
                open_until = until if open_until is None else min(open_until, until)
            elif health.state is State.DISABLED:
                disabled += 1
        return Blocked(cooling_until, open_until, cooling, opened, disabled)

    def states(self) -> dict[int, Health]:
        """A copy of every non-default record (for operator commands and tests)."""
        return dict(self._states)

    # --- writes ---------------------------------------------------------------------------

    async def report(self, account_id: int, event: Event, now: float | None = None) -> Transition | None:
        """Apply ``event`` (what an attempt on ``account_id`` showed); returns the transition, if any."""
        now = self._clock() if now is None else now
        self._trials.pop(account_id, None)  # any outcome ends this process's trial
        health, transition = self.machine.apply(self.health(account_id), event, now)
        self._states[account_id] = health
        if transition is not None:
            self._sink(transition)
        return transition

    async def try_acquire_probe(self, account_id: int, now: float | None = None) -> bool:
        """Take the half-open trial of ``account_id``; False if it is not due or already taken.

        Held until the next ``report`` for the account, or ``policy.trial_ttl`` at most.
        """
        now = self._clock() if now is None else now
        if self.admission(account_id, now) is not Admission.TRIAL:
            return False
        return await self.try_lock_probe(account_id, now)

    async def try_lock_probe(self, account_id: int, now: float | None = None) -> bool:
        """Take the account's probe lock whatever its state (the prober's; one probe per
        account at a time); False if held. Released by the next ``report`` for the account,
        or after ``policy.trial_ttl``."""
        now = self._clock() if now is None else now
        if self._trials.get(account_id, 0.0) > now:
            return False
        self._trials[account_id] = now + self.machine.policy.trial_ttl
        return True

    def apply_resets(self, resets: Mapping[int, float | None]) -> None:
        """Forget health older than each account's re-admission time (epoch s; None: never).

        Call after every config snapshot with ``{account_id: health_reset_at}``: this is how
        an operator reset or a probe reaches a replica without Redis. Logs nothing: the
        service that re-admitted the account recorded the transition.
        """
        for account_id, reset_at in resets.items():
            health = self._states.get(account_id)
            if reset_at is None or health is None or health.since >= reset_at or health.is_pristine():
                continue
            self._states[account_id] = Health(account_id, since=reset_at, version=health.version)
            self._trials.pop(account_id, None)

    async def start(self) -> None:
        """Nothing to start in process; present so callers treat both stores alike."""

    async def aclose(self) -> None:
        """Nothing to close in process."""


class RedisHealthStore(LocalHealthStore):
    """Health shared by every replica through Redis, read from a local mirror (module docstring).

    ``redis`` is a ``redis.asyncio.Redis`` (bytes or decoded responses). Call ``await
    start()`` once (idempotent; it is also started by the first ``report``): it loads
    every record and subscribes to changes.
    """

    def __init__(
        self,
        redis: redis_async.Redis,
        machine: HealthMachine | None = None,
        *,
        sink: Sink = _discard,
        clock: Clock = time.time,
        prefix: str = DEFAULT_PREFIX,
        resync_interval: float = 30.0,
        max_pending: int = 10_000,
    ) -> None:
        super().__init__(machine, sink=sink, clock=clock)
        self._redis = redis
        self.prefix = prefix
        self._resync_interval = resync_interval
        self._max_pending = max_pending
        self._token = f"{os.getpid()}-{os.urandom(6).hex()}"
        self._release_probe = redis.register_script(RELEASE_PROBE_LUA)
        self._pending: dict[int, list[tuple[Event, float]]] = {}
        self._releases: set[int] = set()
        self._flusher = BackgroundFlush(
            self._flush,
            pending=lambda: bool(self._pending or self._releases),
            what="account health to Redis",
            log=logger,
        )
        self._listener: asyncio.Task[None] | None = None
        self._synced: asyncio.Event | None = None
        self.writes = 0  # successful shared writes (tests and metrics)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, timeout: float = 2.0) -> None:
        """Subscribe and load the shared records; waits up to ``timeout`` for the first load."""
        if self._listener is None:
            self._synced = asyncio.Event()
            self._listener = asyncio.get_running_loop().create_task(self._listen())
        assert self._synced is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._synced.wait(), timeout)

    async def aclose(self, timeout: float = 2.0) -> None:
        """Stop the background tasks, then write what is still queued (up to ``timeout``)."""
        await self._flusher.stop()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        self._listener = None
        if self._pending or self._releases:
            try:
                await asyncio.wait_for(self._flush(), timeout)
            except Exception:
                logger.warning("account health not written to Redis at shutdown", exc_info=True)

    # --- writes ---------------------------------------------------------------------------

    async def report(self, account_id: int, event: Event, now: float | None = None) -> Transition | None:
        """Apply ``event`` to the mirror now and queue it for Redis (no I/O here).

        Returns the transition as this replica sees it; the logged one is computed by
        the writer against the shared record.
        """
        now = self._clock() if now is None else now
        if self._trials.pop(account_id, None) is not None:
            self._releases.add(account_id)
        old = self.health(account_id)
        health, transition = self.machine.apply(old, event, now)
        if health != old:
            self._states[account_id] = health
            queue = self._pending.setdefault(account_id, [])
            queue.append((event, now))
            if len(queue) > self._max_pending:  # Redis down for long: keep the newest
                del queue[: len(queue) - self._max_pending]
        if account_id in self._pending or account_id in self._releases:
            self._kick()
        return transition

    async def try_lock_probe(self, account_id: int, now: float | None = None) -> bool:
        """The probe lock across replicas (``SET NX PX``; see LocalHealthStore.try_lock_probe)."""
        now = self._clock() if now is None else now
        if self._trials.get(account_id, 0.0) > now:
            return False
        ttl = self.machine.policy.trial_ttl
        try:
            won = await self._redis.set(self._probe_key(account_id), self._token, nx=True, px=max(1, int(ttl * 1000)))
        except Exception:
            logger.warning("probe lock for account %s: Redis unavailable, deciding locally", account_id)
            won = True
        if won:
            self._trials[account_id] = now + ttl
        return bool(won)

    def _kick(self) -> None:
        self._flusher.kick()
        if self._listener is None:
            self._synced = asyncio.Event()
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _flush(self) -> None:
        """Write every queued event and lock release; what fails stays queued."""
        releases, self._releases = self._releases, set()
        for account_id in releases:
            try:
                await self._release_probe((self._probe_key(account_id),), (self._token,))
            except Exception:
                self._releases.add(account_id)
                raise
        while self._pending:
            account_id = next(iter(self._pending))
            events = self._pending.pop(account_id)
            try:
                health, transitions = await self._transact(account_id, events)
            except BaseException:
                self._pending.setdefault(account_id, [])[:0] = events
                raise
            self.writes += 1
            self._accept(health)
            for transition in transitions:
                self._sink(transition)

    async def _transact(
        self, account_id: int, events: Sequence[tuple[Event, float]]
    ) -> tuple[Health, list[Transition]]:
        from redis.exceptions import WatchError

        key = self._account_key(account_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.hgetall(key)
                    old, new, transitions = fold(raw, account_id, events, self.machine)
                    if new == old:
                        await pipe.unwatch()
                        return old, []
                    version = int(await pipe.incr(self._seq_key()))
                    new = replace(new, version=version)
                    pipe.multi()
                    pipe.hset(key, mapping=hash_fields(new))
                    pipe.sadd(self._ids_key(), account_id)
                    pipe.publish(self.prefix, orjson.dumps(new.to_wire()))
                    await pipe.execute()
                    return new, transitions
                except WatchError:
                    continue  # another replica wrote this account meanwhile: fold again

    # --- the mirror -----------------------------------------------------------------------

    def _accept(self, health: Health) -> None:
        current = self._states.get(health.account_id)
        if current is None or health.version > current.version:
            self._states[health.account_id] = self._with_pending(health)

    def _with_pending(self, health: Health) -> Health:
        """``health`` (a shared record) with this replica's events not written yet applied on
        top, as :meth:`report` applied them to the mirror: a shared record older than those
        events must not take them back. (It did: a write of the first of three quick server
        errors, accepted between the second and the third, left the mirror at two failures when
        the third was reported, so the probe that three failures of one tenant ask for was never
        queued.) Transitions are not logged here; the writer logs them against the shared record."""
        for event, at in self._pending.get(health.account_id, ()):
            health, _ = self.machine.apply(health, event, at)
        return health

    def on_message(self, data: bytes | str) -> None:
        """Apply one published record to the mirror (ignored if malformed or not newer)."""
        try:
            health = Health.from_wire(orjson.loads(data))
        except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError):
            health = None
        if health is None or health.account_id <= 0:
            logger.warning("ignoring a malformed health message")
            return
        self._accept(health)

    async def resync(self) -> int:
        """Reload every shared record into the mirror; returns how many were newer."""
        ids = await self._redis.smembers(self._ids_key())
        if not ids:
            return 0
        account_ids = sorted(int(i) for i in ids)
        async with self._redis.pipeline(transaction=False) as pipe:
            for account_id in account_ids:
                pipe.hgetall(self._account_key(account_id))
            rows = await pipe.execute()
        updated = 0
        stale: list[int] = []
        for account_id, raw in zip(account_ids, rows, strict=True):
            if not raw:
                stale.append(account_id)
                continue
            health = Health.from_wire(raw)
            current = self._states.get(account_id)
            if current is None or health.version > current.version:
                self._states[account_id] = self._with_pending(health)
                updated += 1
        if stale:
            await self._redis.srem(self._ids_key(), *stale)
        return updated

    async def _listen(self) -> None:
        delay = 0.5
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.prefix)
                # Subscribed first, loaded second: nothing published in between is lost.
                await self.resync()
                if self._synced is not None:
                    self._synced.set()
                delay = 0.5
                next_resync = time.monotonic() + self._resync_interval
                while True:
                    raise_if_cancelled()  # a cancellation a library swallowed whole still ends it
                    wait = max(0.0, next_resync - time.monotonic())
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                    if message is not None and message.get("type") == "message":
                        self.on_message(message["data"])
                    if time.monotonic() >= next_resync:
                        await self.resync()
                        next_resync = time.monotonic() + self._resync_interval
            except asyncio.CancelledError:
                raise
            except Exception:
                raise_if_cancelled()
                if delay == 0.5:  # the first failure of an outage; the retries are not logged
                    logger.warning("account health subscription lost; reconnecting in %.1fs", delay, exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    # --- keys -----------------------------------------------------------------------------

    def _account_key(self, account_id: int) -> str:
        return account_key(self.prefix, account_id)

    def _ids_key(self) -> str:
        return f"{self.prefix}:ids"

    def _seq_key(self) -> str:
        return f"{self.prefix}:seq"

    def _probe_key(self, account_id: int) -> str:
        return probe_key(self.prefix, account_id)


# --- shared pieces (also used from sync code: services, commands) -----------------


def settings_prefix() -> str:
    """The key prefix of this deployment: ``GATEWAY_HEALTH_REDIS_PREFIX``, default ``gw:health``."""
    from django.conf import settings

    return str(getattr(settings, "GATEWAY_HEALTH_REDIS_PREFIX", None) or DEFAULT_PREFIX)


def account_key(prefix: str, account_id: int) -> str:
    return f"{prefix}:acct:{account_id}"


def probe_key(prefix: str, account_id: int) -> str:
    return f"{prefix}:probe:{account_id}"


def hash_fields(health: Health) -> dict[Any, str]:  # Any keys: redis-py types mapping keys widely
    """The Redis hash of a record: every field as a string, "" for None."""
    return {name: "" if value is None else str(value) for name, value in health.to_wire().items()}


def fold(
    raw: Mapping[Any, Any], account_id: int, events: Sequence[tuple[Event, float]], machine: HealthMachine
) -> tuple[Health, Health, list[Transition]]:
    """Apply ``(event, at)`` pairs in order to the record ``raw`` (a Redis hash; empty: new)."""
    old = Health.from_wire(raw) if raw else Health(account_id)
    health = old
    transitions: list[Transition] = []
    for event, at in events:
        health, transition = machine.apply(health, event, at)
        if transition is not None:
            transitions.append(transition)
    return old, health, transitions


def sync_client() -> redis_sync.Redis | None:
    """The synchronous client of ``settings.REDIS_URL``; None in embedded mode."""
    from django.conf import settings

    url: str = settings.REDIS_URL
    return redis_client_for(url) if url else None


def read_states_sync(
    client: redis_sync.Redis, account_ids: Iterable[int], prefix: str | None = None
) -> dict[int, Health]:
    """The shared records of ``account_ids`` (missing ones: absent from the result)."""
    prefix = prefix or settings_prefix()
    ids = list(account_ids)
    pipe = client.pipeline(transaction=False)
    for account_id in ids:
        pipe.hgetall(account_key(prefix, account_id))
    result: dict[int, Health] = {}
    for account_id, raw in zip(ids, pipe.execute(), strict=True):
        if raw:
            result[account_id] = Health.from_wire(raw)
    return result


def apply_sync(
    client: redis_sync.Redis,
    account_id: int,
    events: Sequence[Event],
    now: float,
    *,
    machine: HealthMachine | None = None,
    prefix: str | None = None,
) -> tuple[Health, list[Transition]]:
    """Apply ``events`` to the shared record and publish it (the sync twin of the writer).

    For operator resets. Returns the new record and the transitions,
    which the caller logs (nothing here writes to the database).
    """
    from redis.exceptions import WatchError

    machine = machine or HealthMachine(HealthPolicy.from_settings())
    prefix = prefix or settings_prefix()
    key = account_key(prefix, account_id)
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(key)
                old, new, transitions = fold(pipe.hgetall(key), account_id, [(e, now) for e in events], machine)
                if new == old:
                    pipe.unwatch()
                    return old, []
                new = replace(new, version=int(pipe.incr(f"{prefix}:seq")))
                pipe.multi()
                pipe.hset(key, mapping=hash_fields(new))
                pipe.sadd(f"{prefix}:ids", account_id)
                pipe.publish(prefix, orjson.dumps(new.to_wire()))
                pipe.execute()
                return new, transitions
            except WatchError:
                continue


def health_store_from_settings(redis: redis_async.Redis | None, sink: Sink) -> LocalHealthStore:
    """The store for this process: shared through ``redis`` when given, else in process."""
    machine = HealthMachine(HealthPolicy.from_settings())
    if redis is None:
        return LocalHealthStore(machine, sink=sink)
    return RedisHealthStore(redis, machine, sink=sink, prefix=settings_prefix())
