"""Where health lives: the in-process store, and the Redis-shared one seen by two "replicas".

Two RedisHealthStore objects on one Redis stand for two gateway processes: what one
learns (a 429, a failure streak) must reach the other's local mirror, each transition
must be logged once, and the half-open trial lock must be exclusive. The Redis tests
run when ``REDIS_URL`` is set (each under its own key prefix) and are skipped otherwise.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest

from accounts.health.machine import (
    Admission,
    AuthFailure,
    Health,
    HealthMachine,
    HealthPolicy,
    RateLimited,
    Reset,
    ServerError,
    State,
    Success,
    Transition,
)
from accounts.health.store import Blocked, LocalHealthStore, RedisHealthStore, apply_sync, read_states_sync
from accounts.health.transitions import TransitionLog
from accounts.routing.stickiness import RedisStickyStore

REDIS_URL = os.environ.get("REDIS_URL", "")
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="REDIS_URL is not set")


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- LocalHealthStore --------------------------------------------------------------------


def test_local_store_applies_events_and_logs_transitions() -> None:
    clock = Clock()
    logged: list[Transition] = []
    store = LocalHealthStore(sink=logged.append, clock=clock)

    async def scenario() -> None:
        assert store.usable(1)
        transition = await store.report(1, RateLimited(retry_after=5.0))
        assert transition is not None
        assert transition.to_state is State.COOLING
        assert not store.usable(1)
        assert store.usable(2)
        assert store.earliest_deadline([1, 2]) == clock.now + 5.0
        assert await store.report(2, Success()) is None
        clock.now += 5.0
        assert store.usable(1)
        assert store.earliest_deadline([1, 2]) is None
        await store.report(1, Success())

    asyncio.run(scenario())
    assert [(t.from_state, t.to_state) for t in logged] == [
        (State.HEALTHY, State.COOLING),
        (State.COOLING, State.HEALTHY),
    ]


def test_local_earliest_deadline_skips_disabled_and_takes_the_minimum() -> None:
    clock = Clock()
    store = LocalHealthStore(clock=clock)

    async def scenario() -> None:
        await store.report(1, RateLimited(retry_after=30.0))
        await store.report(2, RateLimited(retry_after=10.0))
        await store.report(3, AuthFailure(401))
        for _ in range(3):
            await store.report(4, ServerError("502"))

    asyncio.run(scenario())
    assert store.earliest_deadline([1, 2, 3]) == clock.now + 10.0
    assert store.earliest_deadline([1, 4]) == clock.now + 5.0  # the circuit's next trial
    assert store.earliest_deadline([3]) is None
    assert store.blocked([1, 2, 3, 4, 5]) == Blocked(clock.now + 10.0, clock.now + 5.0, 2, 1, 1)
    assert store.blocked([3]) == Blocked(None, None, 0, 0, 1)
    clock.now += 5.0  # the circuit is due a trial: usable, so not blocked
    assert store.blocked([4]) == Blocked(None, None, 0, 0, 0)


def test_local_half_open_trial_is_taken_once() -> None:
    clock = Clock()
    store = LocalHealthStore(clock=clock)

    async def scenario() -> None:
        for _ in range(3):
            await store.report(1, ServerError("500"))
        assert store.admission(1) is Admission.DENY
        assert not await store.try_acquire_probe(1)  # not due yet
        clock.now += 5.0
        assert store.admission(1) is Admission.TRIAL
        assert await store.try_acquire_probe(1)
        assert store.admission(1) is Admission.DENY  # taken: nobody else gets it
        assert not await store.try_acquire_probe(1)
        await store.report(1, Success())
        assert store.admission(1) is Admission.ADMIT
        # A lock whose holder vanished expires after trial_ttl.
        for _ in range(3):
            await store.report(1, ServerError("500"))
        clock.now += 5.0
        assert await store.try_acquire_probe(1)
        clock.now += store.machine.policy.trial_ttl
        assert store.admission(1) is Admission.TRIAL

    asyncio.run(scenario())


def test_apply_resets_forgets_older_health_only() -> None:
    clock = Clock()
    store = LocalHealthStore(clock=clock)

    async def scenario() -> None:
        await store.report(1, AuthFailure(401))
        await store.report(2, AuthFailure(401))

    asyncio.run(scenario())
    store.apply_resets({1: clock.now + 1.0, 2: clock.now - 1.0, 3: clock.now, 4: None})
    assert store.usable(1)
    assert store.health(1).is_pristine()
    assert not store.usable(2)  # disabled after that reset: stays disabled
    assert store.health(3) == Health(3)


# --- TransitionLog -----------------------------------------------------------------------


def test_transition_log_batches_and_retries() -> None:
    written: list[list[Transition]] = []
    failures = [True]

    def writer(rows: Any) -> None:
        if failures and failures.pop():
            raise RuntimeError("database down")
        written.append(list(rows))

    log = TransitionLog(interval=0.01, writer=writer)
    row = Transition(1, State.HEALTHY, State.COOLING, "x", 1.0, 2.0)

    async def scenario() -> None:
        log.add(row)
        log.add(row)
        deadline = time.monotonic() + 5
        while not written and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        log.add(row)
        await log.aclose()

    asyncio.run(scenario())
    assert sum(len(batch) for batch in written) == 3
    assert written[0] == [row, row]
    assert log.pending() == 0


def test_transition_log_is_bounded() -> None:
    log = TransitionLog(writer=lambda rows: None, max_pending=3)
    for i in range(5):
        log.add(Transition(i, State.HEALTHY, State.DISABLED, "x", 1.0))
    assert log.pending() == 3
    assert log.dropped == 2
    log.flush_sync()
    assert log.written == 3


@pytest.mark.django_db
def test_transition_log_default_writer_stores_rows() -> None:
    from accounts.models import AccountTransition
    from accounts.services import pool_get_or_create, upstream_account_create

    pool = pool_get_or_create(name="main")
    account = upstream_account_create(pool=pool, base_url="http://127.0.0.1:9/v1", models=["m"])
    log = TransitionLog()
    log.add(Transition(account.pk, State.HEALTHY, State.COOLING, "rate limited", 1_700_000_000.0, 1_700_000_005.0))
    log.add(Transition(999_999, State.HEALTHY, State.DISABLED, "gone", 1_700_000_000.0))  # deleted account
    log.flush_sync()
    row = AccountTransition.objects.get()
    assert (row.account_id, row.from_state, row.to_state, row.reason) == (
        account.pk,
        "healthy",
        "cooling",
        "rate limited",
    )
    assert row.at.timestamp() == 1_700_000_000.0
    assert row.until is not None
    assert row.until.timestamp() == 1_700_000_005.0


# --- RedisHealthStore: two replicas --------------------------------------------------------


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout: float = 3.0) -> None:
    """Poll ``check`` (sync or async) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def replicas(
    count: int = 2, **options: Any
) -> AsyncIterator[tuple[list[RedisHealthStore], list[Transition], str, Any]]:
    import redis.asyncio as aioredis

    prefix = f"gwtest:{uuid.uuid4().hex}:health"
    logged: list[Transition] = []
    clients = [aioredis.Redis.from_url(REDIS_URL) for _ in range(count)]
    stores = [RedisHealthStore(client, sink=logged.append, prefix=prefix, **options) for client in clients]
    try:
        for store in stores:
            await store.start()
        yield stores, logged, prefix, clients[0]
    finally:
        for store in stores:
            await store.aclose()
        keys = [key async for key in clients[0].scan_iter(match=f"{prefix}*")]
        if keys:
            await clients[0].delete(*keys)
        for client in clients:
            await client.aclose()


@needs_redis
def test_a_429_seen_by_one_replica_is_honoured_by_the_other() -> None:
    async def scenario() -> None:
        async with replicas() as ((a, b), logged, prefix, redis):
            assert a.usable(7)
            assert b.usable(7)
            transition = await a.report(7, RateLimited(retry_after=30.0))
            assert transition is not None
            assert not a.usable(7)  # this replica: at once, before any Redis round trip
            await eventually(lambda: not b.usable(7))
            deadline = b.earliest_deadline([7])
            assert deadline is not None
            assert deadline == pytest.approx(time.time() + 30.0, abs=2.0)
            assert b.health(7).state is State.COOLING
            # Stored in Redis as a hash with the deadline.
            stored = await redis.hgetall(f"{prefix}:acct:7")
            assert stored[b"state"] == b"cooling"
            assert float(stored[b"until"]) == pytest.approx(deadline)
            assert await redis.sismember(f"{prefix}:ids", 7)
            await eventually(lambda: len(logged) == 1)
            await asyncio.sleep(0.1)
            assert len(logged) == 1  # logged once, by the replica that wrote it

    asyncio.run(scenario())


@needs_redis
def test_failures_from_both_replicas_add_up_to_open_the_circuit() -> None:
    async def scenario() -> None:
        async with replicas() as ((a, b), logged, _, _redis):
            await a.report(3, ServerError("502"))
            await eventually(lambda: b.health(3).failures == 1)
            await b.report(3, ServerError("timeout"))
            await eventually(lambda: a.health(3).failures == 2)
            await a.report(3, ServerError("connect"))
            for store in (a, b):
                await eventually(lambda store=store: store.health(3).state is State.CIRCUIT_OPEN)  # type: ignore[misc]
            await eventually(lambda: len(logged) == 1)
            assert logged[0].to_state is State.CIRCUIT_OPEN

    asyncio.run(scenario())


@needs_redis
def test_concurrent_reports_lose_no_update() -> None:
    async def scenario() -> None:
        policy = HealthPolicy(failure_threshold=1000)
        async with replicas(machine=HealthMachine(policy)) as ((a, b), _, prefix, redis):
            for _ in range(20):
                await a.report(5, ServerError("500"))
                await b.report(5, ServerError("500"))
            await eventually(lambda: a.health(5).failures == 40 and b.health(5).failures == 40)
            assert int((await redis.hgetall(f"{prefix}:acct:5"))[b"failures"]) == 40

    asyncio.run(scenario())


@needs_redis
def test_trial_lock_is_exclusive_across_replicas() -> None:
    async def scenario() -> None:
        policy = HealthPolicy(open_base=0.2)
        async with replicas(machine=HealthMachine(policy)) as ((a, b), logged, prefix, redis):
            for _ in range(3):
                await a.report(9, ServerError("503"))
            await eventually(lambda: b.health(9).state is State.CIRCUIT_OPEN)
            await asyncio.sleep(0.25)
            assert a.admission(9) is Admission.TRIAL
            assert b.admission(9) is Admission.TRIAL
            results = await asyncio.gather(a.try_acquire_probe(9), b.try_acquire_probe(9))
            assert sorted(results) == [False, True]
            winner, loser = (a, b) if results[0] else (b, a)
            assert winner.admission(9) is Admission.DENY
            assert await redis.exists(f"{prefix}:probe:9")
            await winner.report(9, Success())
            await eventually(lambda: loser.health(9).state is State.HEALTHY)
            await eventually(lambda: lock_released(redis, f"{prefix}:probe:9"))
            assert [t.reason for t in logged][-1] == "trial request succeeded"

    async def lock_released(redis: Any, key: str) -> bool:
        return not await redis.exists(key)

    asyncio.run(scenario())


@needs_redis
def test_a_replica_started_later_loads_the_shared_state() -> None:
    async def scenario() -> None:
        import redis.asyncio as aioredis

        async with replicas(count=1) as ((a,), _, prefix, _redis):
            await a.report(11, AuthFailure(401, "invalid_api_key"))
            await eventually(lambda: a.writes == 1)
            client = aioredis.Redis.from_url(REDIS_URL)
            late = RedisHealthStore(client, prefix=prefix)
            try:
                await late.start()
                assert late.health(11).state is State.DISABLED
                assert "invalid_api_key" in late.health(11).reason
                assert not late.usable(11)
            finally:
                await late.aclose()
                await client.aclose()

    asyncio.run(scenario())


@needs_redis
def test_resync_repairs_a_missed_message() -> None:
    import redis as redis_sync

    async def scenario() -> None:
        async with replicas(count=1, resync_interval=0.2) as ((a,), _, prefix, _redis):
            # Written behind the subscriber's back: no PUBLISH reaches it.
            sync = redis_sync.Redis.from_url(REDIS_URL)
            key = f"{prefix}:acct:21"
            health = Health(21, State.COOLING, until=time.time() + 60, reason="set elsewhere", version=10**9)
            sync.hset(key, mapping={k: "" if v is None else str(v) for k, v in health.to_wire().items()})
            sync.sadd(f"{prefix}:ids", 21)
            await eventually(lambda: a.health(21).state is State.COOLING, timeout=3.0)

    asyncio.run(scenario())


@needs_redis
def test_old_messages_do_not_overwrite_newer_state() -> None:
    async def scenario() -> None:
        async with replicas(count=1) as ((a,), _, _, _redis):
            await a.report(4, AuthFailure(401))
            await eventually(lambda: a.writes == 1)
            version = a.health(4).version
            a.on_message(b"not json")  # ignored
            a.on_message(b'{"state": "cooling"}')  # no account id: ignored
            assert a.health(0) == Health(0)
            a.on_message(orjson.dumps(Health(4, version=version - 1).to_wire()))
            assert a.health(4).state is State.DISABLED
            a.on_message(orjson.dumps(Health(4, version=version + 1).to_wire()))
            assert a.health(4).state is State.HEALTHY

    asyncio.run(scenario())


@needs_redis
def test_sync_apply_reaches_running_replicas() -> None:
    """The path of operator resets and the prober: a sync write, published to every mirror."""
    import redis as redis_sync

    async def scenario() -> None:
        async with replicas() as ((a, b), _, prefix, _redis):
            await a.report(8, AuthFailure(403))
            await eventually(lambda: b.health(8).state is State.DISABLED)
            sync = redis_sync.Redis.from_url(REDIS_URL)
            health, transitions = await asyncio.to_thread(
                apply_sync, sync, 8, [Reset("reset by operator")], time.time(), prefix=prefix
            )
            assert health.state is State.HEALTHY
            assert [(t.from_state, t.to_state) for t in transitions] == [(State.DISABLED, State.HEALTHY)]
            for store in (a, b):
                await eventually(lambda store=store: store.usable(8))  # type: ignore[misc]
            states = await asyncio.to_thread(read_states_sync, sync, [8, 99], prefix)
            assert set(states) == {8}
            assert states[8].state is State.HEALTHY

    asyncio.run(scenario())


@needs_redis
def test_redis_down_keeps_the_local_mirror_protecting() -> None:
    import redis.asyncio as aioredis

    async def scenario() -> None:
        client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
        store = RedisHealthStore(client, prefix=f"gwtest:{uuid.uuid4().hex}:health")
        try:
            await store.start(timeout=0.3)
            await store.report(1, RateLimited(retry_after=30.0))
            assert not store.usable(1)
            assert await store.try_acquire_probe(1) is False  # not due: no Redis call
        finally:
            await store.aclose(timeout=0.3)
            await client.aclose()

    asyncio.run(scenario())


# --- RedisStickyStore: two replicas --------------------------------------------------------


@needs_redis
def test_sticky_binding_is_shared_through_redis() -> None:
    import redis.asyncio as aioredis

    from gateway.limits.redis_backend import RedisLimiter

    async def scenario() -> None:
        prefix = f"gwtest:{uuid.uuid4().hex}:sticky"
        client_a, client_b = aioredis.Redis.from_url(REDIS_URL), aioredis.Redis.from_url(REDIS_URL)
        # Bindings are sent the way the gateway sends them: carried by the rate limiter's next call.
        carrier_a = RedisLimiter(client_a, prefix=prefix + ":rl:", config_key=prefix + ":gen")
        carrier_b = RedisLimiter(client_b, prefix=prefix + ":rl:", config_key=prefix + ":gen")
        a = RedisStickyStore(client_a, carry=carrier_a.carry, prefix=prefix, ttl=60)
        b = RedisStickyStore(client_b, carry=carrier_b.carry, prefix=prefix, ttl=60)
        try:
            assert await a.lookup("k") is None
            assert a.bind("k", 3, usable=lambda _: True)
            assert await a.lookup("k") == 3  # answered locally while the write is on its way
            await carrier_a.flush()
            assert await b.lookup("k") == 3
            ttl = await client_a.ttl(f"{prefix}:k")
            assert 0 < ttl <= 60
            # B fails over to 4 while 3 is healthy: the binding stays.
            assert not b.bind("k", 4, usable=lambda _: True)
            assert await b.lookup("k") == 3
            # 3 becomes unusable: B rebinds, and A sees it once its local entry is stale.
            assert b.bind("k", 4, usable=lambda account: account != 3)
            await carrier_b.flush()
            assert await client_a.get(f"{prefix}:k") == b"4"
            assert a.stale(["k", "other"]) == ["other"]  # "k" was confirmed here lately
        finally:
            await carrier_a.aclose()
            await carrier_b.aclose()
            await client_a.delete(f"{prefix}:k")
            await client_a.aclose()
            await client_b.aclose()

    asyncio.run(scenario())


@needs_redis
def test_sticky_absent_answer_is_trusted_briefly() -> None:
    """A new key read as unbound with the admission is not asked again by dispatch, but a binding
    another replica makes meanwhile is seen once ABSENT_TTL has passed."""
    import redis.asyncio as aioredis

    from accounts.routing.stickiness import ABSENT_TTL
    from gateway.limits.redis_backend import RedisLimiter

    async def scenario() -> None:
        prefix = f"gwtest:{uuid.uuid4().hex}:sticky"
        now = [1000.0]
        client = aioredis.Redis.from_url(REDIS_URL)
        carrier = RedisLimiter(client, prefix=prefix + ":rl:", config_key=prefix + ":gen")
        a = RedisStickyStore(client, carry=carrier.carry, prefix=prefix, ttl=60, clock=lambda: now[0])
        b = RedisStickyStore(client, carry=carrier.carry, prefix=prefix, ttl=60, clock=lambda: now[0])
        try:
            assert a.stale(["k"]) == ["k"]
            assert a.learn("k", None) is None  # what the admission read
            assert a.stale(["k"]) == []
            assert await a.lookup("k") is None  # answered locally: no GET
            assert b.bind("k", 7, usable=lambda _: True)
            await carrier.flush()
            now[0] += ABSENT_TTL
            assert a.stale(["k"]) == ["k"]
            assert await a.lookup("k") == 7
        finally:
            await carrier.aclose()
            await client.delete(f"{prefix}:k")
            await client.aclose()

    asyncio.run(scenario())


@needs_redis
def test_one_probe_per_account_across_replicas() -> None:
    """The prober's lock (try_lock_probe) is shared: while replica A probes an account,
    replica B's prober leaves it alone; once A's report released it, B may probe."""
    from accounts.health.probing import DISABLED_PROBE_INTERVAL, Prober
    from accounts.upstream.account import AccountInfo
    from tests.unit.test_prober import StubClient, Target

    async def scenario() -> None:
        async with replicas() as ((a, b), _, prefix, redis):
            stub = StubClient()

            async def targets() -> list[AccountInfo]:
                return [Target(1)]

            prober = Prober(b, stub, targets, clock=lambda: time.time() + DISABLED_PROBE_INTERVAL)
            await a.report(1, AuthFailure(401))
            await eventually(lambda: b.health(1).state is State.DISABLED)
            assert await a.try_lock_probe(1)
            assert await prober.run_once() == []
            assert stub.sent == []
            await a.report(1, AuthFailure(401))  # A's probe answered: the lock is released
            await eventually(lambda: _gone(redis, f"{prefix}:probe:1"))
            [outcome] = await prober.run_once()
            assert (outcome.before, outcome.after) == (State.DISABLED, State.HEALTHY)
            await eventually(lambda: a.health(1).state is State.HEALTHY)

    asyncio.run(scenario())


async def _gone(redis: Any, key: str) -> bool:
    return not await redis.exists(key)


def test_a_shared_record_older_than_this_replicas_unwritten_events_does_not_take_them_back() -> None:
    """Three quick server errors of one tenant must leave the mirror at three failures, so that
    the confirming probe is asked for, even when a shared record written before the last ones
    (another replica's, or this one's own first write) arrives in between. Before, the mirror
    took the shared record as it was: the third error was applied to one failure, not two, and
    no probe was queued (the live test
    test_one_tenants_server_errors_do_not_open_the_circuit_for_the_others failed now and then)."""
    import redis.asyncio as aioredis

    machine = HealthMachine()

    async def scenario() -> tuple[int, bool, int]:
        # No Redis behind it: nothing here waits on it (the writer only retries in the background).
        store = RedisHealthStore(aioredis.Redis.from_url("redis://127.0.0.1:9/0"), machine)
        try:
            now = time.time()
            await store.report(9, ServerError("500", tenant=1), now)
            await store.report(9, ServerError("500", tenant=1), now)
            # A record another replica wrote with one failure of the same tenant (a newer version).
            shared, _ = machine.apply(Health(9, version=5), ServerError("500", tenant=1), now)
            store.on_message(orjson.dumps(shared.to_wire()))
            after_message = store.health(9).failures  # its one and this replica's two unwritten
            await store.report(9, ServerError("500", tenant=1), now)
            return (
                after_message,
                machine.wants_probe(store.health(9), ServerError("500", tenant=1)),
                store.health(9).version,
            )
        finally:
            await store.aclose(timeout=0.2)

    after_message, wants_probe, version = asyncio.run(scenario())
    assert after_message == 3
    assert wants_probe
    assert version == 5  # still the shared record's version: a newer write replaces it
