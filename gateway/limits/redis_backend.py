"""The Redis backend of gateway.limits.engine: every replica shares the same counters exactly.

One admit is one round trip: a Lua script checks every limit of every scope and counts
them only if all pass, atomically, and returns the configuration change token
(``gw:config:gen``) as well, so the gateway's per-request config check rides along, and
the values of the keys the caller asks to read along (``admit(reads=...)``: the data
plane's sticky bindings of a new prompt_cache_key).
Settlements, lease releases and the writes handed to :meth:`carry` (sticky bindings)
never add a round trip to a request: they are queued, the next admit of this process
carries up to ``piggyback`` settlement operations and every queued write in its own
script call (applied before its checks, so it sees the leases and reservations this
process gave back), and a background task sends what is still queued ``linger``
seconds later as one script call per ``max_batch`` operations (what an idle process
gives back reaches the other replicas after ``linger`` + one RTT).

Keys (``prefix`` defaults to ``gw:rl:``), each with a TTL so nothing grows for ever:

- ``{prefix}{name}:{id}:m:{minute}``: hash ``r`` (requests), ``t`` (tokens) of one
  epoch minute; expires 120 s after its first count.
- ``{prefix}{name}:{id}:c``: sorted set of concurrency leases scored by their expiry
  (ms); expired leases are dropped when the set is full; the key expires
  ``lease_ttl`` after the last admit.
- ``{prefix}{name}:{id}:b:{window_start}``: hash ``st``/``sm`` (spent tokens/micros),
  ``rt``/``rm`` (reserved), ``as``/``ah`` (soft/hard alert sent); expires
  ``budget_grace`` seconds after the window ends. Its absence means "seed me".

The scripts build these names from the prefix and per-scope specs rather than take
them in ``KEYS``, and take their input as a few JSON strings: redis-py spends ~4 us of
client CPU per command argument, more than the script spends decoding the JSON
(``cjson``, in C: a batch of five admissions cost 130 us of Redis CPU against 164 us
when the scripts split comma-separated text with Lua patterns). So this needs a
standalone Redis (or Sentinel), not Redis Cluster.

The scripts are files next to this module: ``admit.lua`` and ``settle.lua``, each
prefixed with ``settle_ops.lua`` (the settle function both use), run through redis-py's
``register_script``: ``EVALSHA``, and after Redis lost its scripts (a restart, ``SCRIPT
FLUSH``) ``SCRIPT LOAD`` + ``EVALSHA`` once: one round trip more than the ``EVAL``
fallback of the hand-written class it replaced, once per script after each restart.
Measured with ``bench/redis_scripts.py`` (the admit script, sequential calls, one
connection): 105.5 us of client CPU per call against 96.0 us for a bare
``execute_command("EVALSHA", ...)`` (its per-call import and argument copies). Kept: the
admissions of one event-loop iteration share one call (below), which divides that
difference by the batch (5 admissions a call on average under 16 concurrent requests).

Coalescing: :meth:`admit` queues its admission and the first one queued in an event-loop
iteration schedules (``call_soon``) one script call for all those queued by then, so
concurrent requests share a round trip, its client CPU (a socket write costs ~40 us here)
and the script's fixed cost in Redis. A lone request waits for nothing but the end of
its loop iteration. Each request still makes exactly one round trip, its batch's; the
admissions of a batch are applied in order, each atomically, as separate calls would be.

The admit script (``ADMIT_LUA``):

- ``KEYS[1]`` = the config token key.
- ``ARGV[1]`` = settlements to apply first, as the settle script's ``ARGV[1]``
  (empty: none).
- ``ARGV[2]`` = writes to apply first: ``"key value ttl"`` lines (``SET key value EX
  ttl``; empty: none).
- ``ARGV[3]`` = the admissions, a JSON array of ``[head, specs, reads]``: ``head`` =
  ``[prefix, minute, now_ms, est_tokens, est_micros, lease_id, lease_ttl_ms,
  minute_ttl_s, budget_grace_s]``, ``specs`` one per scope: ``["name:id", rpm, tpm,
  concurrency, budget_tokens, budget_micros, window_start, window_end, seed_tokens,
  seed_micros]`` (limits -1 = unlimited; no budget limit = no budget counter; seeds -1 =
  report a missing budget counter instead of creating it; lease ``"-"`` = none),
  ``reads``: keys to GET.
- returns an array: the config key's raw value (nil without the key: then
  ``Decision.config_token`` is None, as ``GET`` would say), the alerts of the carried
  settlements (as the settle script returns them), then per admission its reply
  ``"status|counts|fails|alerts"`` followed by the values of its keys to read (nil:
  missing). Status 1 admitted (counted), 0 refused (nothing counted), 2 budget counters
  missing (nothing counted; ``fails`` lists the 0-based scope indices to seed);
  ``counts`` = per scope ``requests,tokens`` used in the minute (after counting when
  admitted); ``fails`` = ``index,kind`` pairs (kind 0 rpm, 1 tpm, 2 concurrency, 3
  budget); ``alerts`` = ``index,kind,spent_tokens,spent_micros`` (kind 2: the first
  refusal of a budget sets its hard alert), all comma-separated integers.

The settle script (``SETTLE_LUA``) applies a batch: ``ARGV[2]`` = writes, as the
admit script's; ``ARGV[1]`` = a JSON array: ``prefix`` then one operation per ticket
scope: ``["name:id", minute, window_start, requests_delta, tokens_delta, lease_id,
budgeted, -reserved_tokens, -reserved_micros, spent_tokens, spent_micros, soft_tokens,
soft_micros, hard_tokens, hard_micros]``
(lease ``"-"`` = none; budgeted 0/1; thresholds -1 = none). It touches a minute or
budget counter only if it still exists (a counter re-created by a seed after a Redis
restart does not hold this reservation, so reserved totals are clamped at zero) and
returns ``"op,kind,spent_tokens,spent_micros,..."`` for the alerts that fired
(kind 1 soft, 2 hard).

A batch whose reply is lost (connection dropped after the script ran) is retried and
so applied twice: at worst a reservation is released early and spend counted twice,
which errs on the side of refusing. While Redis is unreachable the queue holds up to
``max_pending`` settlements (oldest dropped beyond that, with an error logged: their
leases expire, their reservations stay until the window ends). Admit propagates Redis
errors to the caller.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from accounts.infra.batching import BackgroundFlush
from gateway.limits.engine import (
    BUDGET_GRACE,
    LEASE_TTL,
    MINUTE,
    SEED_RETRY,
    AlertHook,
    Decision,
    Scope,
    Seed,
    Seeder,
    Ticket,
    fire_alert,
    limit_report,
    new_lease_id,
    rate_headers,
    refusal,
    threshold,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)

# The same key as gateway.config.notify.CONFIG_GEN_KEY (not imported: this module stays
# free of Django so that plain processes can use it).
CONFIG_GEN_KEY = "gw:config:gen"
MINUTE_TTL = 120

_HERE = Path(__file__).parent
# The scripts live next to this module (settle_ops.lua: the settle function both use).
_SETTLE_OPS = (_HERE / "settle_ops.lua").read_text()
ADMIT_LUA = _SETTLE_OPS + (_HERE / "admit.lua").read_text()
SETTLE_LUA = _SETTLE_OPS + (_HERE / "settle.lua").read_text()

_ALERT_KINDS = {1: "soft", 2: "hard"}


def redis_client(url: str, *, max_connections: int = 64, timeout: float = 5.0) -> Redis:
    """An asyncio client whose pool makes callers wait for a free connection.

    redis-py's default pool opens one connection per concurrent command and raises
    ``MaxConnectionsError`` past 100: a burst of requests would fail their admits.
    A blocking pool queues them instead (``timeout``: the longest wait).
    """
    from redis.asyncio import BlockingConnectionPool
    from redis.asyncio import Redis as AsyncRedis

    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout)
    return AsyncRedis.from_pool(pool)


# One queued settlement: (ticket, actual tokens, actual micros, requests delta).
_Pending = tuple[Ticket, int, int, int]
# One admission waiting for its batch: (its JSON, number of keys to read, its answer).
_Admission = tuple[bytes, int, "asyncio.Future[tuple[object, object, list[object]]]"]


class RedisLimiter:
    """gateway.limits.engine semantics over Redis; one script call per admit (see the module docstring).

    ``redis`` is the caller's ``redis.asyncio.Redis``; ``Decision.config_token`` has the
    type its ``decode_responses`` gives (bytes by default), like
    ``gateway.config.notify.config_token_async``. Times come from the caller's ``now``:
    replicas need synchronised clocks (NTP) to share minute windows.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        seed: Seed | None = None,
        on_alert: AlertHook | None = None,
        lease_ttl: float = LEASE_TTL,
        prefix: str = "gw:rl:",
        config_key: str = CONFIG_GEN_KEY,
        linger: float = 0.02,
        max_batch: int = 256,
        piggyback: int = 32,
        max_pending: int = 100_000,
        seed_retry: float = SEED_RETRY,
        budget_grace: int = BUDGET_GRACE,
        on_round_trip: Callable[[float], object] | None = None,
    ) -> None:
        self._redis = redis
        # Told each admission script call's round trip (seconds): the Redis latency metric.
        self._on_round_trip = on_round_trip
        self._admit_script = redis.register_script(ADMIT_LUA)
        self._settle_script = redis.register_script(SETTLE_LUA)
        self._seeder = Seeder(seed, seed_retry)
        self._on_alert = on_alert
        self._lease_ttl_ms = int(lease_ttl * 1000)
        self._prefix = prefix
        self._keys = (config_key,)
        self._linger = linger
        self._max_batch = max_batch
        self._piggyback = piggyback
        self._max_pending = max_pending
        self._budget_grace = budget_grace
        self._queue: deque[_Pending] = deque()
        self._writes: dict[str, tuple[str, int]] = {}
        self._batch: list[_Admission] = []
        self._batches: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._flusher = BackgroundFlush(
            self._flush_batch,
            pending=lambda: bool(self._queue or self._writes),
            what="rate-limit settlements to Redis",
            linger=linger,
            max_backoff=5.0,
            log=logger,
        )

    async def admit(
        self,
        scopes: Sequence[Scope],
        *,
        tokens: int,
        micros: int = 0,
        now: float | None = None,
        reads: Sequence[str] = (),
    ) -> Decision:
        """As ``Limiter.admit``; ``reads``: Redis keys read in the same call (``Decision.reads``)."""
        now = time.time() if now is None else now
        minute = int(now // MINUTE)
        lease = new_lease_id() if any(scope.concurrency is not None for scope in scopes) else ""
        seed = (-1, -1) if self._seeder.seed is not None else (0, 0)
        head = [
            self._prefix,
            minute,
            int(now * 1000),
            tokens,
            micros,
            lease or "-",
            self._lease_ttl_ms,
            MINUTE_TTL,
            self._budget_grace,
        ]
        specs = [_spec(scope, seed) for scope in scopes]
        started = time.monotonic()
        attempts = 0
        unenforced: set[int] = set()

        def ticket() -> Ticket:
            budgeted = tuple(scope.has_budget and i not in unenforced for i, scope in enumerate(scopes))
            return Ticket(tuple(scopes), tokens, micros, minute, lease, budgeted)

        call = orjson.dumps([head, specs, reads])
        status, counts, fails, alerts, token, values = await self._call(call, len(reads), ticket)
        while status == 2:
            # Some budget counters are missing: seed them (off the common path), then
            # ask again with the seeds, which the script uses only if still missing.
            attempts += 1
            for index in fails:
                seeded = await self._seeder.get(scopes[index], started) if attempts < 3 else None
                if seeded is None:  # no seed: this budget is not enforced for this request
                    unenforced.add(index)
                    specs[index] = _spec(replace(scopes[index], budget_tokens=None, budget_micros=None), seed)
                else:
                    specs[index] = _spec(scopes[index], seeded)
            status, counts, fails, alerts, token, _ = await self._call(orjson.dumps([head, specs, ()]), 0, ticket)
        used_r = counts[0::2]
        used_t = counts[1::2]
        for j in range(0, len(alerts), 4):
            fire_alert(self._on_alert, scopes[alerts[j]], "hard", alerts[j + 2], alerts[j + 3])
        headers = rate_headers(scopes, used_r, used_t, now)
        if status != 1:
            pairs = [(fails[j], fails[j + 1]) for j in range(0, len(fails), 2)]
            exceeded, retry, message = refusal(scopes, pairs, used_r, used_t, tokens, now)
            return Decision(False, exceeded, retry, headers, None, token, message, values)
        return Decision(True, None, None, headers, ticket(), token, reads=values)

    async def _call(
        self, admission: bytes, reads: int, ticket: Callable[[], Ticket]
    ) -> tuple[int, list[int], list[int], list[int], object, tuple[object, ...]]:
        """One admission (as JSON, with its ``reads`` keys to read), sent in its batch's script call.

        Returns (status, counts, fails, alerts, config token, values of the keys read). If the
        caller is cancelled meanwhile (its client left), the admission still goes with its
        batch; when it turns out admitted, ``ticket()`` is cancelled (``cancel``), so its
        lease, reservation and request are given back.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[tuple[object, object, list[object]]] = loop.create_future()
        self._batch.append((admission, reads, waiter))
        if len(self._batch) == 1:
            loop.call_soon(self._send_batch)
        try:
            token, reply, values = await asyncio.shield(waiter)
        except asyncio.CancelledError:
            waiter.add_done_callback(functools.partial(self._give_back, ticket))
            raise
        status, counts, fails, alerts = _admit_reply(reply)
        return status, counts, fails, alerts, token, tuple(values)

    def _give_back(self, ticket: Callable[[], Ticket], waiter: asyncio.Future[tuple[object, object, object]]) -> None:
        """The answer of an admission whose caller is gone: cancel it if it was admitted."""
        if waiter.cancelled() or waiter.exception() is not None:
            return
        if _admit_reply(waiter.result()[1])[0] == 1:
            self.cancel(ticket())

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, []
        task = asyncio.get_running_loop().create_task(self._run_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_batch(self, batch: list[_Admission]) -> None:
        """The admissions of one loop iteration in one script call, with what rides along."""
        # Queued settlements ride along: no round trip of their own, and these admissions
        # already see the leases and reservations that this process gave back.
        limit = self._piggyback * len(batch)
        carried, ops, settle_arg = self._take(limit) if self._queue else ([], [], b"")
        writes, write_arg = self._take_writes()
        try:
            admissions = b"[" + b",".join(admission for admission, _, _ in batch) + b"]"
            started = time.perf_counter()
            raw = await self._admit_script(self._keys, (settle_arg, write_arg, admissions))
            if self._on_round_trip is not None:
                self._on_round_trip(time.perf_counter() - started)
        except BaseException as exc:
            self._queue.extendleft(reversed(carried))
            self._restore_writes(writes)
            for _, _, waiter in batch:
                if waiter.done():
                    continue
                if isinstance(exc, Exception):
                    waiter.set_exception(exc)  # redis.exceptions.* as raised, for the caller to map
                else:
                    waiter.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        self._fire_settle_alerts(ops, _text(raw[1]))
        at = 2
        for _, count, waiter in batch:
            if not waiter.done():
                waiter.set_result((raw[0], raw[at], raw[at + 1 : at + 1 + count]))
            at += 1 + count

    async def peek(self, scopes: Sequence[Scope], *, now: float | None = None) -> list[dict[str, object]]:
        """Each scope's limits and what is left of them now (reads only; not the hot path).

        A budget without a counter yet reports what the seed says was spent.
        """
        now = time.time() if now is None else now
        minute = int(now // MINUTE)
        pipe = self._redis.pipeline(transaction=False)
        for scope in scopes:
            base = f"{self._prefix}{scope.name}:{scope.id}:"
            pipe.hmget(f"{base}m:{minute}", "r", "t")
            pipe.zcount(f"{base}c", int(now * 1000), "+inf")
            pipe.hmget(f"{base}b:{scope.window_start}", "st", "sm")
        replies = await pipe.execute()
        reports = []
        for i, scope in enumerate(scopes):
            (requests, tokens), in_flight, (spent_t, spent_m) = replies[3 * i : 3 * i + 3]
            if scope.has_budget and spent_t is None:
                seeded = await self._seeder.get(scope)  # no counter yet (e.g. after a Redis restart)
                if seeded is not None:
                    spent_t, spent_m = seeded
            reports.append(
                limit_report(
                    scope,
                    now,
                    requests=int(requests or 0),
                    tokens=int(tokens or 0),
                    in_flight=int(in_flight or 0),
                    spent_tokens=int(spent_t) if spent_t is not None else None,
                    spent_micros=int(spent_m) if spent_m is not None else None,
                )
            )
        return reports

    def settle(self, ticket: Ticket, *, tokens: int | None, micros: int | None) -> None:
        self._enqueue(ticket, tokens, micros, 0)

    def cancel(self, ticket: Ticket) -> None:
        self._enqueue(ticket, 0, 0, -1)

    def pending(self) -> int:
        """Settlements and writes queued and not yet applied."""
        return len(self._queue) + len(self._writes)

    def carry(self, key: str, value: str, ttl: int) -> None:
        """``SET key value EX ttl`` with the next admission, or the background batch (never raises).

        For writes that need no round trip of their own (sticky bindings). Queued per key:
        a newer value replaces one not sent yet. Neither may contain blanks.
        """
        self._writes.pop(key, None)
        if len(self._writes) >= self._max_pending:
            self._writes.pop(next(iter(self._writes)))
            logger.error("Redis writes pile up (Redis unreachable?); dropped the oldest")
        self._writes[key] = (value, max(1, ttl))
        self._kick()

    def _take_writes(self) -> tuple[dict[str, tuple[str, int]], str]:
        if not self._writes:
            return {}, ""
        writes, self._writes = self._writes, {}
        return writes, "\n".join(f"{key} {value} {ttl}" for key, (value, ttl) in writes.items())

    def _restore_writes(self, writes: dict[str, tuple[str, int]]) -> None:
        for key, write in writes.items():
            self._writes.setdefault(key, write)  # newer writes win

    def _enqueue(self, ticket: Ticket, tokens: int | None, micros: int | None, requests: int) -> None:
        if ticket.settled:
            return
        ticket.settled = True
        actual_t = ticket.tokens if tokens is None else tokens
        actual_m = ticket.micros if micros is None else micros
        if len(self._queue) >= self._max_pending:
            self._queue.popleft()
            logger.error("rate-limit settlements pile up (Redis unreachable?); dropped the oldest")
        self._queue.append((ticket, actual_t, actual_m, requests))
        self._kick()

    def _kick(self) -> None:
        """Make sure the background task will send what is queued."""
        self._flusher.kick()  # no event loop here: flush() or aclose() applies it

    def _take(self, max_ops: int) -> tuple[list[_Pending], list[Scope], bytes]:
        """Dequeue settlements worth up to ``max_ops`` operations: (items, op scopes, script argument)."""
        items: list[_Pending] = []
        parts: list[object] = [self._prefix]
        ops: list[Scope] = []
        while self._queue and len(ops) < max_ops:
            item = self._queue.popleft()
            items.append(item)
            ticket, actual_t, actual_m, requests = item
            for i, scope in enumerate(ticket.scopes):
                minute_used = scope.rpm is not None or scope.tpm is not None
                budgeted = ticket.budgeted[i]
                lease = ticket.lease if ticket.lease and scope.concurrency is not None else "-"
                if not (minute_used or budgeted or lease != "-"):
                    continue
                parts.append(
                    (
                        f"{scope.name}:{scope.id}",
                        ticket.minute,
                        scope.window_start,
                        requests if minute_used else 0,
                        actual_t - ticket.tokens if minute_used else 0,
                        lease,
                        1 if budgeted else 0,
                        -ticket.tokens,
                        -ticket.micros,
                        actual_t,
                        actual_m,
                        threshold(scope.budget_tokens, scope.soft_percent),
                        threshold(scope.budget_micros, scope.soft_percent),
                        threshold(scope.budget_tokens, 100),
                        threshold(scope.budget_micros, 100),
                    )
                )
                ops.append(scope)
        return items, ops, orjson.dumps(parts) if ops else b""

    def _fire_settle_alerts(self, ops: Sequence[Scope], reply: str) -> None:
        alerts = _ints(reply)
        for j in range(0, len(alerts), 4):
            kind = _ALERT_KINDS[alerts[j + 1]]
            fire_alert(self._on_alert, ops[alerts[j]], kind, alerts[j + 2], alerts[j + 3])

    async def _flush_batch(self) -> None:
        """Apply up to ``max_batch`` operations and the queued writes in one script call.

        On failure they stay queued.
        """
        async with self._lock:
            items, ops, text = self._take(self._max_batch)
            writes, write_arg = self._take_writes()
            if not ops and not writes:
                return
            try:
                reply = await self._settle_script((), (text, write_arg))
            except BaseException:
                self._queue.extendleft(reversed(items))
                self._restore_writes(writes)
                raise
        self._fire_settle_alerts(ops, _text(reply))

    async def flush(self) -> None:
        """Apply every queued settlement and write now (raises if Redis fails; they stay queued)."""
        while self._queue or self._writes:
            await self._flush_batch()

    async def aclose(self) -> None:
        """Stop the background task and apply what is queued (failures are logged)."""
        async with self._lock:  # let a batch in flight finish: cancelled, it could be applied twice
            await self._flusher.stop()
        try:
            await self.flush()
        except Exception:
            logger.exception("could not apply %d rate-limit settlements at shutdown", len(self._queue))


def _spec(scope: Scope, seed: tuple[int, int]) -> tuple[object, ...]:
    """A scope as the admit script reads it (see the module docstring)."""
    rpm = -1 if scope.rpm is None else scope.rpm
    tpm = -1 if scope.tpm is None else scope.tpm
    conc = -1 if scope.concurrency is None else scope.concurrency
    bt = -1 if scope.budget_tokens is None else scope.budget_tokens
    bm = -1 if scope.budget_micros is None else scope.budget_micros
    return (f"{scope.name}:{scope.id}", rpm, tpm, conc, bt, bm, scope.window_start, scope.window_end, *seed)


def _admit_reply(raw: object) -> tuple[int, list[int], list[int], list[int]]:
    """(status, counts, fails, alerts) of one admission's reply."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)  # str with decode_responses=True
    status, counts, fails, alerts = text.split("|")
    return int(status), _ints(counts), _ints(fails), _ints(alerts)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw  # str with decode_responses=True


def _ints(raw: str) -> list[int]:
    """Comma-separated integers of a script reply (empty: none)."""
    return [int(value) for value in raw.split(",")] if raw else []
