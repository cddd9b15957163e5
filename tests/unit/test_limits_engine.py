"""The limit engine (gateway/limits/engine.py, gateway/limits/redis_backend.py): both backends, same semantics.

Every engine test runs against LocalLimiter and RedisLimiter; the Redis half skips when
REDIS_URL is not set. Each test uses its own key prefix and deletes its keys. Time is
the caller's ``now``, so windows and lease expiry are driven without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.limits.engine import (
    LocalLimiter,
    Scope,
    estimate_tokens,
    format_duration,
    rejection_error,
)

REDIS_URL = os.environ.get("REDIS_URL", "")
ROOT = Path(__file__).resolve().parents[2]

NOW = 1_700_000_040.0  # on a minute boundary
assert NOW % 60 == 0
DAY = 86_400
WINDOW = (1_699_920_000, 1_699_920_000 + DAY)  # the budget window around NOW


def budget_scope(**limits: Any) -> Scope:
    return Scope("key", 1, window_start=WINDOW[0], window_end=WINDOW[1], **limits)


class Backend:
    """Makes limiters of one kind; the Redis ones share a per-test key prefix."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.prefix = f"gwtest:{uuid.uuid4().hex}:"
        self.token: object = None
        self.redis: Any = None

    @contextlib.asynccontextmanager
    async def limiter(self, **options: Any) -> AsyncIterator[Any]:
        if self.kind == "local":
            limiter: Any = LocalLimiter(token_source=lambda: self.token, **options)
            yield limiter
            await limiter.aclose()
            return
        from gateway.limits.redis_backend import RedisLimiter, redis_client

        client = redis_client(REDIS_URL)
        self.redis = client
        limiter = RedisLimiter(client, prefix=self.prefix, config_key=self.prefix + "config:gen", **options)
        try:
            yield limiter
        finally:
            await limiter.aclose()
            await client.aclose()
            self.redis = None

    async def set_token(self, value: str | None) -> None:
        if self.kind == "local":
            self.token = value
        elif value is None:
            await self.redis.delete(self.prefix + "config:gen")
        else:
            await self.redis.set(self.prefix + "config:gen", value)

    def expected_token(self, value: str | None) -> object:
        return value.encode() if self.kind == "redis" and value is not None else value


def _cleanup(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["local", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "redis" and not REDIS_URL:
        pytest.skip("REDIS_URL is not set")
    b = Backend(request.param)
    yield b
    if b.kind == "redis":
        _cleanup(b.prefix)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    if not REDIS_URL:
        pytest.skip("REDIS_URL is not set")
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    yield prefix
    _cleanup(prefix)


def headers_of(decision: Any) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in decision.headers}


# --- rpm / tpm -----------------------------------------------------------------


def test_rpm_is_exact_under_concurrency(backend: Backend) -> None:
    async def main() -> None:
        async with backend.limiter() as limiter:
            scope = Scope("key", 1, rpm=50)
            decisions = await asyncio.gather(*(limiter.admit([scope], tokens=1, now=NOW + 1) for _ in range(200)))
            assert sum(d.allowed for d in decisions) == 50
            refused = [d for d in decisions if not d.allowed]
            assert {d.exceeded for d in refused} == {"key.rpm"}
            assert {d.code for d in refused} == {"rate_limit_exceeded"}
            assert all(d.ticket is None for d in refused)
            assert refused[0].retry_after == pytest.approx(59.0)
            assert headers_of(refused[0])["x-ratelimit-remaining-requests"] == "0"
            # The next minute is a fresh window.
            assert (await limiter.admit([scope], tokens=1, now=NOW + 60)).allowed

    asyncio.run(main())


def test_refused_admit_counts_nothing_in_any_scope(backend: Backend) -> None:
    async def main() -> None:
        async with backend.limiter() as limiter:
            key = Scope("key", 1, rpm=3)
            tenant = Scope("tenant", 1, rpm=100, tpm=10_000)
            for _ in range(3):
                assert (await limiter.admit([key, tenant], tokens=10, now=NOW)).allowed
            refused = await limiter.admit([key, tenant], tokens=10, now=NOW)
            assert not refused.allowed
            assert refused.exceeded == "key.rpm"
            # The tenant saw three requests and 30 tokens, not four and 40.
            other_key = Scope("key", 2, rpm=3)
            ok = await limiter.admit([other_key, tenant], tokens=10, now=NOW)
            assert ok.allowed
            headers = headers_of(ok)
            assert headers["x-ratelimit-remaining-tokens"] == str(10_000 - 40)
            # The most constrained scope's requests: the new key has 2 left, the tenant 96.
            assert headers["x-ratelimit-remaining-requests"] == "2"
            assert headers["x-ratelimit-limit-requests"] == "3"

    asyncio.run(main())


def test_tenant_limit_names_the_tenant(backend: Backend) -> None:
    async def main() -> None:
        async with backend.limiter() as limiter:
            tenant = Scope("tenant", 7, rpm=2)
            for key_id in (1, 2):
                assert (await limiter.admit([Scope("key", key_id, rpm=10), tenant], tokens=1, now=NOW)).allowed
            refused = await limiter.admit([Scope("key", 3, rpm=10), tenant], tokens=1, now=NOW)
            assert refused.exceeded == "tenant.rpm"
            error = rejection_error(refused)
            assert error.status == 429
            assert error.code == "rate_limit_exceeded"
            assert error.param == "tenant.rpm"
            names = dict(error.headers)
            assert names[b"retry-after"] == b"60"
            assert names[b"x-ratelimit-remaining-requests"] == b"0"

    asyncio.run(main())


def test_tpm_counts_the_estimate_and_is_corrected_on_settle(backend: Backend) -> None:
    async def main() -> None:
        async with backend.limiter() as limiter:
            scope = Scope("key", 1, tpm=1000)
            first = await limiter.admit([scope], tokens=600, now=NOW)
            assert first.allowed
            assert first.ticket is not None
            assert headers_of(first)["x-ratelimit-remaining-tokens"] == "400"
            refused = await limiter.admit([scope], tokens=600, now=NOW)
            assert refused.exceeded == "key.tpm"
            limiter.settle(first.ticket, tokens=100, micros=0)
            await limiter.flush()
            second = await limiter.admit([scope], tokens=600, now=NOW)
            assert second.allowed
            assert second.ticket is not None
            assert headers_of(second)["x-ratelimit-remaining-tokens"] == "300"
            # Unknown usage keeps the estimate: nothing changes.
            limiter.settle(second.ticket, tokens=None, micros=None)
            await limiter.flush()
            third = await limiter.admit([scope], tokens=300, now=NOW)
            assert headers_of(third)["x-ratelimit-remaining-tokens"] == "0"

    asyncio.run(main())


def test_cancel_gives_the_request_back(backend: Backend) -> None:
    async def main() -> None:
        async with backend.limiter() as limiter:
            scope = Scope("key", 1, rpm=1, tpm=100)
            first = await limiter.admit([scope], tokens=100, now=NOW)
            assert first.ticket is not None
            assert not (await limiter.admit([scope], tokens=1, now=NOW)).allowed
            limiter.cancel(first.ticket)
            limiter.cancel(first.ticket)  # twice is harmless
            await limiter.flush()
            again = await limiter.admit([scope], tokens=100, now=NOW)
            assert again.allowed

    asyncio.run(main())


# --- concurrency -----------------------------------------------------------------


def test_concurrency_leases_are_released_by_settle_and_expire(backend: Backend) -> None:
    async def main() -> None:
        async with backend.limiter(lease_ttl=30) as limiter:
            scope = Scope("key", 1, concurrency=2)
            tenant = Scope("tenant", 1, concurrency=5)
            a = await limiter.admit([scope, tenant], tokens=1, now=NOW)
            b = await limiter.admit([scope, tenant], tokens=1, now=NOW)
            assert a.ticket is not None
            assert b.allowed
            refused = await limiter.admit([scope, tenant], tokens=1, now=NOW)
            assert refused.exceeded == "key.concurrency"
            assert refused.retry_after == pytest.approx(1.0)
            limiter.settle(a.ticket, tokens=1, micros=0)
            await limiter.flush()
            c = await limiter.admit([scope, tenant], tokens=1, now=NOW + 1)
            assert c.allowed
            # b and c are never settled (a crashed replica): their leases expire.
            assert not (await limiter.admit([scope, tenant], tokens=1, now=NOW + 29)).allowed
            assert (await limiter.admit([scope, tenant], tokens=1, now=NOW + 31.5)).allowed

    asyncio.run(main())


def test_concurrency_is_exact_under_concurrency(backend: Backend) -> None:
    async def main() -> None:
        async with backend.limiter() as limiter:
            scope = Scope("tenant", 3, concurrency=7)
            decisions = await asyncio.gather(*(limiter.admit([scope], tokens=1, now=NOW) for _ in range(100)))
            assert sum(d.allowed for d in decisions) == 7

    asyncio.run(main())


# --- budgets -------------------------------------------------------------------


@pytest.mark.parametrize("actual", ["equal", "below"])
def test_budget_is_not_overshot_by_50_concurrent_requests(backend: Backend, actual: str) -> None:
    async def main() -> None:
        async with backend.limiter() as limiter:
            scope = budget_scope(budget_tokens=10_000, budget_micros=2_000_000)
            spent = [0, 0]

            async def request(n: int) -> bool:
                decision = await limiter.admit([scope], tokens=400, micros=50_000, now=NOW)
                if decision.ticket is None:
                    assert decision.exceeded == "key.budget"
                    return False
                await asyncio.sleep(0.001 * (n % 5))
                tokens = 400 if actual == "equal" else 400 - n % 7
                micros = 50_000 if actual == "equal" else 50_000 - n
                spent[0] += tokens
                spent[1] += micros
                limiter.settle(decision.ticket, tokens=tokens, micros=micros)
                return True

            for _ in range(3):  # waves until the budget is exhausted
                await asyncio.gather(*(request(n) for n in range(50)))
                await limiter.flush()
            assert spent[0] <= 10_000
            assert spent[1] <= 2_000_000
            if actual == "equal":
                assert spent[0] == 10_000  # 25 requests of 400 fit exactly
            refused = await limiter.admit([scope], tokens=400, micros=50_000, now=NOW)
            assert refused.code == "budget_exceeded"
            assert refused.retry_after == pytest.approx(WINDOW[1] - NOW)
            error = rejection_error(refused)
            assert error.code == "budget_exceeded"
            assert error.param == "key.budget"

    asyncio.run(main())


def test_money_budget_with_concurrent_reservations(backend: Backend) -> None:
    async def main() -> None:
        async with backend.limiter() as limiter:
            tenant = Scope("tenant", 9, budget_micros=1_000_000, window_start=WINDOW[0], window_end=WINDOW[1])
            decisions = await asyncio.gather(
                *(limiter.admit([Scope("key", n), tenant], tokens=1, micros=100_000, now=NOW) for n in range(50))
            )
            assert sum(d.allowed for d in decisions) == 10
            assert {d.exceeded for d in decisions if not d.allowed} == {"tenant.budget"}

    asyncio.run(main())


def test_refund_on_failure_frees_the_reservation(backend: Backend) -> None:
    async def main() -> None:
        async with backend.limiter() as limiter:
            scope = budget_scope(budget_tokens=1000)
            first = await limiter.admit([scope], tokens=600, now=NOW)
            assert first.ticket is not None
            assert not (await limiter.admit([scope], tokens=600, now=NOW)).allowed
            limiter.settle(first.ticket, tokens=0, micros=0)  # the upstream failed
            await limiter.flush()
            second = await limiter.admit([scope], tokens=600, now=NOW)
            assert second.ticket is not None
            limiter.settle(second.ticket, tokens=None, micros=None)  # unknown: the estimate is spent
            await limiter.flush()
            assert not (await limiter.admit([scope], tokens=500, now=NOW)).allowed
            assert (await limiter.admit([scope], tokens=400, now=NOW)).allowed

    asyncio.run(main())


def test_alerts_fire_once_per_window(backend: Backend) -> None:
    async def main() -> None:
        alerts: list[tuple[str, int, str, int, int, int]] = []

        def on_alert(scope: Scope, kind: str, tokens: int, micros: int, window_start: int) -> None:
            alerts.append((scope.name, scope.id, kind, tokens, micros, window_start))

        async with backend.limiter(on_alert=on_alert) as limiter:
            scope = budget_scope(budget_tokens=1000, soft_percent=50)
            for _ in range(4):
                decision = await limiter.admit([scope], tokens=100, now=NOW)
                assert decision.ticket is not None
                limiter.settle(decision.ticket, tokens=100, micros=0)
            await limiter.flush()
            assert alerts == []
            for _ in range(3):  # crosses 50% once
                decision = await limiter.admit([scope], tokens=100, now=NOW)
                assert decision.ticket is not None
                limiter.settle(decision.ticket, tokens=100, micros=0)
                await limiter.flush()
            assert alerts == [("key", 1, "soft", 500, 0, WINDOW[0])]
            # A refusal raises the hard alert once.
            assert not (await limiter.admit([scope], tokens=400, now=NOW)).allowed
            assert not (await limiter.admit([scope], tokens=400, now=NOW)).allowed
            assert alerts[1:] == [("key", 1, "hard", 700, 0, WINDOW[0])]
            for _ in range(3):
                decision = await limiter.admit([scope], tokens=100, now=NOW)
                assert decision.ticket is not None
                limiter.settle(decision.ticket, tokens=100, micros=0)
            await limiter.flush()
            assert len(alerts) == 2  # reaching the limit later alerts no more in this window
            # The next window alerts afresh.
            nxt = budget_scope(budget_tokens=1000, soft_percent=50)
            nxt = Scope(
                "key", 1, budget_tokens=1000, soft_percent=50, window_start=WINDOW[1], window_end=WINDOW[1] + DAY
            )
            decision = await limiter.admit([nxt], tokens=1000, now=WINDOW[1] + 5.0)
            assert decision.ticket is not None
            limiter.settle(decision.ticket, tokens=1000, micros=0)
            await limiter.flush()
            assert alerts[2:] == [("key", 1, "soft", 1000, 0, WINDOW[1]), ("key", 1, "hard", 1000, 0, WINDOW[1])]

    asyncio.run(main())


def test_missing_budget_counter_is_seeded_once(backend: Backend) -> None:
    async def main() -> None:
        calls: list[tuple[str, int, int]] = []

        async def seed(scope: Scope) -> tuple[int, int]:
            calls.append((scope.name, scope.id, scope.window_start))
            await asyncio.sleep(0.01)  # a database query in a thread
            return (900, 0)

        async with backend.limiter(seed=seed) as limiter:
            scope = budget_scope(budget_tokens=1000)
            decisions = await asyncio.gather(*(limiter.admit([scope], tokens=100, now=NOW) for _ in range(20)))
            assert calls == [("key", 1, WINDOW[0])]
            assert sum(d.allowed for d in decisions) == 1
            # Known now: no more seeding on the hot path.
            assert not (await limiter.admit([scope], tokens=100, now=NOW)).allowed
            assert len(calls) == 1
            if backend.kind == "redis":
                # A Redis restart loses the counter: the next admit seeds again, once.
                keys = [k async for k in backend.redis.scan_iter(backend.prefix + "key:1:b:*")]
                assert len(keys) == 1
                await backend.redis.delete(*keys)
                decisions = await asyncio.gather(*(limiter.admit([scope], tokens=50, now=NOW) for _ in range(5)))
                assert len(calls) == 2
                assert sum(d.allowed for d in decisions) == 2

    asyncio.run(main())


def test_failing_seed_fails_open_and_is_retried(backend: Backend) -> None:
    async def main() -> None:
        calls = [0]

        async def seed(scope: Scope) -> tuple[int, int]:
            calls[0] += 1
            if calls[0] == 1:
                raise ConnectionError("database down")
            return (1000, 0)

        async with backend.limiter(seed=seed, seed_retry=0.0) as limiter:
            scope = budget_scope(budget_tokens=1000)
            first = await limiter.admit([scope], tokens=100, now=NOW)
            assert first.allowed  # not enforced while the seed fails
            assert first.ticket is not None
            limiter.settle(first.ticket, tokens=100, micros=0)
            await limiter.flush()
            second = await limiter.admit([scope], tokens=100, now=NOW)
            assert calls[0] == 2
            assert second.exceeded == "key.budget"

    asyncio.run(main())


# --- headers and tokens ------------------------------------------------------------


def test_duration_format_follows_openai() -> None:
    assert format_duration(0.006) == "6ms"
    assert format_duration(1) == "1s"
    assert format_duration(59) == "59s"
    assert format_duration(59.2) == "59.2s"
    assert format_duration(60) == "1m0s"
    assert format_duration(360) == "6m0s"
    assert format_duration(90.5) == "1m30.5s"
    assert format_duration(3723) == "1h2m3s"
    assert format_duration(0) == "0s"


def test_headers_on_admitted_and_refused_decisions(backend: Backend) -> None:
    async def main() -> None:
        async with backend.limiter() as limiter:
            scope = Scope("key", 1, rpm=2, tpm=1000)
            at_boundary = await limiter.admit([scope], tokens=10, now=NOW)
            assert headers_of(at_boundary) == {
                "x-ratelimit-limit-requests": "2",
                "x-ratelimit-remaining-requests": "1",
                "x-ratelimit-reset-requests": "1m0s",
                "x-ratelimit-limit-tokens": "1000",
                "x-ratelimit-remaining-tokens": "990",
                "x-ratelimit-reset-tokens": "1m0s",
            }
            later = await limiter.admit([scope], tokens=10, now=NOW + 0.8)
            assert headers_of(later)["x-ratelimit-reset-requests"] == "59.2s"
            refused = await limiter.admit([scope], tokens=10, now=NOW + 1)
            assert not refused.allowed
            assert headers_of(refused)["x-ratelimit-reset-tokens"] == "59s"
            assert headers_of(refused)["x-ratelimit-remaining-requests"] == "0"
            unlimited = await limiter.admit([Scope("key", 2, concurrency=5)], tokens=10, now=NOW)
            assert unlimited.allowed
            assert unlimited.headers == []

    asyncio.run(main())


def test_decision_carries_the_config_token(backend: Backend) -> None:
    async def main() -> None:
        async with backend.limiter() as limiter:
            scope = Scope("key", 1, rpm=10)
            assert (await limiter.admit([scope], tokens=1, now=NOW)).config_token is None
            await backend.set_token("7")
            assert (await limiter.admit([scope], tokens=1, now=NOW)).config_token == backend.expected_token("7")
            refused = await limiter.admit([Scope("key", 2, rpm=0)], tokens=1, now=NOW)
            assert refused.config_token == backend.expected_token("7")
            assert (await limiter.admit([], tokens=1, now=NOW)).config_token == backend.expected_token("7")

    asyncio.run(main())


def test_estimate_tokens() -> None:
    assert estimate_tokens(400, 100) == 201
    assert estimate_tokens(0, None, default_output=50) == 51


# --- backend specifics -------------------------------------------------------------


def test_local_limiter_memory_does_not_grow_with_windows() -> None:
    async def main() -> None:
        limiter = LocalLimiter(lease_ttl=90)
        for minute in range(5000):
            now = NOW + minute * 60
            day = int(now // DAY) * DAY
            scopes = [
                Scope(
                    "key",
                    1,
                    rpm=10,
                    tpm=1000,
                    concurrency=2,
                    budget_tokens=10**9,
                    window_start=day,
                    window_end=day + DAY,
                ),
                Scope("key", 1000 + minute, rpm=10),  # a scope that is used once and goes idle
            ]
            decision = await limiter.admit(scopes, tokens=5, now=now)
            assert decision.ticket is not None
            if minute % 2:
                limiter.settle(decision.ticket, tokens=5, micros=0)  # the others' leases expire
        assert limiter.state_size() < 20

    asyncio.run(main())


def test_redis_keys_have_ttls(redis_prefix: str) -> None:
    async def main() -> None:
        import redis.asyncio as aioredis

        from gateway.limits.redis_backend import RedisLimiter

        client = aioredis.Redis.from_url(REDIS_URL)
        limiter = RedisLimiter(client, prefix=redis_prefix, config_key=redis_prefix + "gen")
        scope = Scope("key", 1, rpm=10, tpm=100, concurrency=3, budget_tokens=1000, window_start=0, window_end=10)
        decision = await limiter.admit([scope], tokens=10, now=NOW)
        assert decision.ticket is not None
        keys = [k async for k in client.scan_iter(redis_prefix + "*")]
        assert len(keys) == 3
        for key in keys:
            assert await client.ttl(key) > 0, key
        await limiter.aclose()
        await client.aclose()

    asyncio.run(main())


def test_redis_limiter_reloads_its_scripts_after_redis_lost_them(redis_prefix: str) -> None:
    """A Redis restart (or SCRIPT FLUSH) empties the script cache: the next call loads the script again."""

    async def main() -> None:
        from gateway.limits.redis_backend import RedisLimiter, redis_client

        client = redis_client(REDIS_URL)
        limiter = RedisLimiter(client, prefix=redis_prefix, config_key=redis_prefix + "gen", linger=3600)
        scope = Scope("key", 1, rpm=10, concurrency=5)
        assert (await limiter.admit([scope], tokens=1, now=NOW)).allowed
        await client.script_flush()
        second = await limiter.admit([scope], tokens=1, now=NOW)  # admit.lua, loaded again
        assert second.ticket is not None
        limiter.settle(second.ticket, tokens=1, micros=0)
        await client.script_flush()
        await limiter.flush()  # settle.lua, loaded again
        assert limiter.pending() == 0
        report = (await limiter.peek([scope], now=NOW))[0]["concurrent_requests"]
        assert report == {"limit": 5, "in_use": 1, "remaining": 4}  # the first, never settled
        await limiter.aclose()
        await client.aclose()

    asyncio.run(main())


def test_redis_settlements_ride_on_the_next_admit(redis_prefix: str) -> None:
    async def main() -> None:
        from gateway.limits.redis_backend import RedisLimiter, redis_client

        client = redis_client(REDIS_URL)
        alerts: list[str] = []
        limiter = RedisLimiter(
            client,
            prefix=redis_prefix,
            config_key=redis_prefix + "gen",
            linger=3600,  # the background flush never runs in this test
            on_alert=lambda scope, kind, *rest: alerts.append(kind),
        )
        scope = budget_scope(concurrency=1, budget_tokens=1000, soft_percent=50)
        first = await limiter.admit([scope], tokens=600, now=NOW)
        assert first.ticket is not None
        limiter.settle(first.ticket, tokens=600, micros=0)
        assert limiter.pending() == 1
        # One call: the release and the spend are applied before this admit's checks.
        second = await limiter.admit([scope], tokens=400, now=NOW)
        assert second.allowed
        assert limiter.pending() == 0
        assert alerts == ["soft"]
        await limiter.aclose()
        await client.aclose()

    asyncio.run(main())


def test_redis_admit_carries_writes_and_reads_in_its_one_call(redis_prefix: str) -> None:
    async def main() -> None:
        from gateway.limits.redis_backend import RedisLimiter, redis_client

        client = redis_client(REDIS_URL)
        limiter = RedisLimiter(client, prefix=redis_prefix, config_key=redis_prefix + "gen", linger=3600)
        await client.set(redis_prefix + "present", "7")
        limiter.carry(redis_prefix + "bound", "3", 60)
        limiter.carry(redis_prefix + "bound", "4", 60)  # a newer value not sent yet replaces the first
        assert limiter.pending() == 1
        decision = await limiter.admit(
            [Scope("key", 1, rpm=10)],
            tokens=1,
            now=NOW,
            reads=[redis_prefix + "present", redis_prefix + "missing", redis_prefix + "bound"],
        )
        assert decision.allowed
        assert decision.reads == (b"7", None, b"4")  # the carried write is applied before the reads
        assert limiter.pending() == 0
        assert 0 < await client.ttl(redis_prefix + "bound") <= 60
        refused = await limiter.admit([Scope("key", 2, rpm=0)], tokens=1, now=NOW, reads=[redis_prefix + "present"])
        assert not refused.allowed
        assert refused.reads == (b"7",)
        # With no admission coming, the background batch sends what was carried.
        limiter.carry(redis_prefix + "idle", "5", 60)
        await limiter.flush()
        assert await client.get(redis_prefix + "idle") == b"5"
        await limiter.aclose()
        await client.aclose()

    asyncio.run(main())


class CountingRedis:
    """A real client whose scripts count their calls (passed to the limiter like any client)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: list[int] = []  # per script call: how many admissions its last argument carries

    def register_script(self, source: str) -> Any:
        script = self.client.register_script(source)

        async def call(keys: Any, args: Any) -> Any:
            self.calls.append(len(orjson.loads(args[-1])) if len(args) == 3 else 0)
            return await script(keys, args)

        return call

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_redis_concurrent_admits_share_one_script_call(redis_prefix: str) -> None:
    async def main() -> None:
        from gateway.limits.redis_backend import RedisLimiter, redis_client

        client = CountingRedis(redis_client(REDIS_URL))
        limiter = RedisLimiter(client, prefix=redis_prefix, config_key=redis_prefix + "gen", linger=3600)  # type: ignore[arg-type]
        scope = Scope("key", 1, rpm=5, concurrency=10)
        decisions = await asyncio.gather(*(limiter.admit([scope], tokens=1, now=NOW) for _ in range(8)))
        assert client.calls == [8]  # one round trip for the eight
        assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3  # in order, each atomically
        for decision in decisions[:5]:
            assert decision.ticket is not None
            limiter.settle(decision.ticket, tokens=1, micros=0)
        assert not (await limiter.admit([scope], tokens=1, now=NOW)).allowed  # the minute is used up
        assert client.calls == [8, 1]  # the settlements rode along
        assert limiter.pending() == 0
        await limiter.aclose()
        await client.client.aclose()

    asyncio.run(main())


def test_redis_errors_reach_every_admission_of_the_batch_as_redis_exceptions() -> None:
    """Redis down: each admission sharing the failed call raises redis-py's own error (the data plane
    maps it to a 503); the settlements and writes it carried stay queued for a later call."""

    async def main() -> None:
        import redis.exceptions

        from gateway.limits.redis_backend import RedisLimiter, redis_client

        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        client = redis_client(f"redis://127.0.0.1:{port}/0", timeout=1.0)
        limiter = RedisLimiter(client, linger=3600)
        limiter.carry("gwtest:sticky", "1", 60)
        results = await asyncio.gather(
            *(limiter.admit([Scope("key", 1, rpm=10)], tokens=1, now=NOW) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(result, redis.exceptions.ConnectionError) for result in results), results
        assert limiter.pending() == 1
        await client.aclose()

    asyncio.run(main())


def test_redis_admission_of_a_cancelled_request_is_given_back(redis_prefix: str) -> None:
    """A request cancelled while its admission is on its way (its client left): the admission is
    applied with its batch, then cancelled, so its concurrency slot and request come back."""

    async def main() -> None:
        from gateway.limits.redis_backend import RedisLimiter, redis_client

        client = redis_client(REDIS_URL)
        limiter = RedisLimiter(client, prefix=redis_prefix, config_key=redis_prefix + "gen", linger=3600)
        scope = Scope("key", 1, rpm=2, concurrency=1)
        gone = asyncio.ensure_future(limiter.admit([scope], tokens=1, now=NOW))
        await asyncio.sleep(0)  # queued in a batch
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        for _ in range(100):  # the batch's answer arrives, then the admission is cancelled
            if limiter.pending():
                break
            await asyncio.sleep(0.01)
        assert limiter.pending() == 1
        decision = await limiter.admit([scope], tokens=1, now=NOW)
        assert decision.allowed  # the slot came back
        assert decision.ticket is not None
        limiter.settle(decision.ticket, tokens=1, micros=0)
        assert (await limiter.admit([scope], tokens=1, now=NOW)).allowed  # and the request (rpm 2)
        await limiter.aclose()
        await client.aclose()

    asyncio.run(main())


CHILD = """
import asyncio, sys
from gateway.limits.engine import Scope
from gateway.limits.redis_backend import RedisLimiter, redis_client

async def main(url, prefix, n, now):
    client = redis_client(url)
    limiter = RedisLimiter(client, prefix=prefix, config_key=prefix + "gen")
    await client.set(prefix + "child-ready", 1)
    while not await client.exists(prefix + "go"):
        await asyncio.sleep(0.002)
    scope = Scope("key", 1, rpm=50)
    decisions = await asyncio.gather(*(limiter.admit([scope], tokens=1, now=now) for _ in range(n)))
    print(sum(d.allowed for d in decisions))
    await limiter.aclose()
    await client.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
"""


def test_two_processes_share_one_limit_exactly(redis_prefix: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, REDIS_URL, redis_prefix, "150", str(NOW)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )

    async def main() -> int:
        from gateway.limits.redis_backend import RedisLimiter, redis_client

        client = redis_client(REDIS_URL)
        limiter = RedisLimiter(client, prefix=redis_prefix, config_key=redis_prefix + "gen")
        for _ in range(3000):
            if await client.exists(redis_prefix + "child-ready"):
                break
            await asyncio.sleep(0.01)
        await client.set(redis_prefix + "go", 1)
        scope = Scope("key", 1, rpm=50)
        decisions = await asyncio.gather(*(limiter.admit([scope], tokens=1, now=NOW) for _ in range(150)))
        await limiter.aclose()
        await client.aclose()
        return sum(d.allowed for d in decisions)

    try:
        mine = asyncio.run(main())
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0
    assert mine + int(out.strip()) == 50


def test_backends_satisfy_the_protocol() -> None:
    from gateway.limits.engine import Limiter
    from gateway.limits.redis_backend import RedisLimiter

    local: Limiter = LocalLimiter()
    remote: type[Limiter] = RedisLimiter
    assert local is not None
    assert remote is not None
