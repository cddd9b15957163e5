"""Keys on demand and the change feed (gateway/config/keys.py, gateway/config/state.py).

A fake configuration source is passed through the constructor: it counts its reads, and can
fail or hang to stand for a database that refuses or never answers.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import tracemalloc
from typing import Any

import pytest

from gateway.config.keys import ExpiringCache, KeyDirectory, PrefixSet, prefix_number
from gateway.config.snapshot import Snapshot, build_snapshot
from gateway.config.state import ConfigState


def prefix(n: int) -> str:
    return "sk-gw-" + f"{n:010d}"


def row(n: int, tenant_id: int = 1) -> dict[str, Any]:
    return {"id": n, "tenant_id": tenant_id, "tenant_slug": "t", "prefix": prefix(n), "digest": "d" * 64}


class Source:
    """The database as ConfigState sees it: keys by prefix, a change feed, the small rest."""

    def __init__(self, keys: int = 10) -> None:
        self.rows = {prefix(n): row(n) for n in range(1, keys + 1)}
        self.feed: list[dict[str, Any]] = []
        self.key_reads = 0
        self.batches: list[list[str]] = []
        self.snapshots = 0
        self.failing: Exception | None = None
        self.gate: threading.Event | None = None  # set: answer; unset: hang until set

    def _io(self) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        if self.failing is not None:
            raise self.failing

    def snapshot(self, token: object) -> Snapshot:
        self._io()
        self.snapshots += 1
        return build_snapshot(token, [])

    def last_change(self) -> int:
        self._io()
        return len(self.feed)

    def changes(self, after: int, limit: int) -> list[dict[str, Any]]:
        self._io()
        return self.feed[after:][:limit]

    def keys(self, prefixes: list[str]) -> dict[str, dict[str, Any]]:
        self._io()
        self.key_reads += 1
        self.batches.append(list(prefixes))
        return {p: self.rows[p] for p in prefixes if p in self.rows}

    def prefixes(self) -> list[str]:
        self._io()
        return list(self.rows)

    def change(self, kind: str, key_prefix: str = "", tenant_id: int | None = None) -> None:
        self.feed.append({"id": len(self.feed) + 1, "kind": kind, "prefix": key_prefix, "tenant_id": tenant_id})


class Token:
    def __init__(self) -> None:
        self.value = 0

    async def __call__(self) -> object:
        return self.value


def state(source: Source, token: Token, **options: Any) -> ConfigState:
    return ConfigState(token, source, max_age=3600, key_cache_size=options.pop("size", 1000), **options)


async def settle(config: ConfigState) -> None:
    """Let the background load of the membership set (MEMBERS_DELAY after start) finish."""
    for _ in range(500):
        if config.keys.members is not None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the membership set was not loaded")


def test_prefix_set_membership_is_exact() -> None:
    members = PrefixSet([prefix(n) for n in range(0, 1000, 2)] + ["not-a-key"])
    assert all(members.has(prefix(n)) for n in range(0, 1000, 2))
    assert not any(members.has(prefix(n)) for n in range(1, 1000, 2))
    members.add(prefix(3))
    assert members.has(prefix(3))
    assert len(members) == 501
    assert prefix_number("sk-gw-zzzzzzzzzz") is not None
    assert prefix_number("sk-gw-zzzzzzzzz") is None


def test_a_cold_key_is_read_once_even_by_concurrent_requests() -> None:
    source = Source()
    keys = KeyDirectory(source.keys, size=100)

    async def scenario() -> None:
        found = await asyncio.gather(*(keys.get(prefix(1)) for _ in range(20)))
        assert None not in found
        assert {info.key_id for info in found if info is not None} == {1}
        await keys.get(prefix(1))

    asyncio.run(scenario())
    assert source.key_reads == 1


def test_concurrent_misses_of_many_keys_are_read_together() -> None:
    """Cold keys asked for at once are read by a few queries of many prefixes, not one each."""
    source = Source(keys=200)
    keys = KeyDirectory(source.keys, size=1000)

    async def scenario() -> list[int | None]:
        found = await asyncio.gather(*(keys.get(prefix(n)) for n in (*range(1, 201), 5000)))
        return [info.key_id if info is not None else None for info in found]

    assert asyncio.run(scenario()) == [*range(1, 201), None]
    assert source.key_reads <= 2  # the first miss alone, then everything queued meanwhile
    assert sorted(p for batch in source.batches for p in batch) == sorted([*map(prefix, range(1, 201)), prefix(5000)])
    assert len(keys) == 200


def test_a_failed_read_fails_its_callers_and_the_next_miss_reads_again() -> None:
    source = Source()
    keys = KeyDirectory(source.keys, size=100)

    async def scenario() -> None:
        source.failing = OSError("database down")
        results = await asyncio.gather(*(keys.get(prefix(n)) for n in (1, 2, 3)), return_exceptions=True)
        assert all(isinstance(r, OSError) for r in results)
        source.failing = None
        info = await keys.get(prefix(2))
        assert info is not None
        assert info.key_id == 2

    asyncio.run(scenario())


def test_a_key_invalidated_while_queued_is_answered_but_not_cached() -> None:
    source = Source()
    keys = KeyDirectory(source.keys, size=100)

    async def scenario() -> None:
        first = asyncio.ensure_future(keys.get(prefix(1)))
        await asyncio.sleep(0)  # queued, its read started
        keys.invalidate([prefix(1)])
        assert (await first) is not None  # the caller that asked still gets an answer
        reads = source.key_reads
        assert await keys.get(prefix(1)) is not None  # but it was not cached: read again
        assert source.key_reads == reads + 1

    asyncio.run(scenario())


def test_unknown_prefixes_never_reach_the_database_once_membership_is_loaded() -> None:
    source = Source()
    keys = KeyDirectory(source.keys, size=100)

    async def scenario() -> None:
        # Before the membership set: each unknown prefix is read once, then negatively cached.
        for _ in range(3):
            assert await keys.get(prefix(5000)) is None
        assert source.key_reads == 1
        keys.set_members(PrefixSet(source.prefixes()))
        for n in range(6000, 7000):
            assert await keys.get(prefix(n)) is None

    asyncio.run(scenario())
    assert source.key_reads == 1


def test_the_cache_is_bounded() -> None:
    source = Source(keys=50)
    keys = KeyDirectory(source.keys, size=10)

    async def scenario() -> None:
        for n in range(1, 51):
            assert await keys.get(prefix(n)) is not None

    asyncio.run(scenario())
    assert len(keys) == 10


def test_a_key_change_drops_only_that_key_and_rebuilds_nothing_else() -> None:
    source, token = Source(), Token()
    config = state(source, token)

    async def scenario() -> None:
        await config.current()
        await settle(config)
        for n in (1, 2):
            assert await config.keys.get(prefix(n)) is not None
        reads = source.key_reads
        del source.rows[prefix(1)]  # revoked
        source.change("key", prefix(1))
        token.value += 1
        await config.current()
        assert await config.keys.get(prefix(1)) is None  # the very next request
        assert await config.keys.get(prefix(2)) is not None  # still cached
        assert source.key_reads == reads + 1
        assert source.snapshots == 1  # the rest was not rebuilt
        # A key created elsewhere: its prefix joins the membership set through the feed.
        source.rows[prefix(99)] = row(99)
        source.change("key", prefix(99))
        token.value += 1
        await config.current()
        assert await config.keys.get(prefix(99)) is not None
        # A price or route change rebuilds the snapshot, and keeps the keys.
        source.change("config")
        token.value += 1
        assert (await config.current()).token == token.value
        assert source.snapshots == 2
        assert await config.keys.get(prefix(2)) is not None
        # A tenant change drops that tenant's keys.
        source.change("tenant", tenant_id=1)
        token.value += 1
        await config.current()
        assert len(config.keys) == 0
        await config.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("fault", "reported"),
    [("refuses", "configuration reload failed: OSError"), ("silent", "configuration reload timed out")],
)
def test_a_database_outage_serves_the_last_snapshot_at_once_and_reports_it(fault: str, reported: str) -> None:
    """Refused: one attempt, then backoff. Silent (accepts, never answers): requests wait
    RELOAD_WAIT at most, then get the last snapshot at once while the reload hangs."""
    source, token = Source(), Token()
    states: list[str | None] = []
    config = state(source, token, on_state=states.append)

    async def scenario() -> None:
        first = await config.current()
        if fault == "refuses":
            source.failing = OSError("connection refused")
        else:
            source.gate = threading.Event()
        token.value += 1
        calls = source.snapshots
        assert await config.current() is first
        results = await asyncio.wait_for(asyncio.gather(*(config.current() for _ in range(100))), 5)
        assert all(result is first for result in results)
        assert states == [reported]  # logged and reported once
        source.failing = None
        if source.gate is not None:
            source.gate.set()
        for _ in range(200):  # the backoff's first delay is 0.5 s
            if (await config.current()).token == token.value:
                break
            await asyncio.sleep(0.01)
        assert (await config.current()).token == token.value
        assert states[-1] is None
        assert source.snapshots == calls  # a key-only feed rebuilt nothing
        await config.aclose()

    asyncio.run(scenario())


def test_memory_stays_flat_across_a_thousand_config_changes() -> None:
    source, token = Source(), Token()
    config = state(source, token)

    async def change(times: int) -> None:
        for _ in range(times):
            source.change("config")
            source.change("key", prefix(1))
            token.value += 1
            await config.current()
            await config.keys.get(prefix(1))

    # What the configuration state can hold: the project's code, asyncio and the key cache's
    # library. Left out: this test's fake source (its feed list grows by design: 2,000 small dicts
    # over the run) and whatever the test runner keeps meanwhile (captured log records).
    held_by = [
        tracemalloc.Filter(True, f"*/{package}/*")
        for package in ("gateway", "accounts", "tenancy", "asyncio", "cachetools")
    ]

    def traced() -> int:
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces(held_by)
        return sum(stat.size for stat in snapshot.statistics("filename"))

    async def scenario() -> tuple[int, int]:
        await config.current()
        await settle(config)
        await change(100)  # warm-up: caches, thread pool, interned objects
        before = traced()
        await change(1000)
        after = traced()
        await config.aclose()
        return before, after

    tracemalloc.start()
    try:
        before, after = asyncio.run(scenario())
    finally:
        tracemalloc.stop()
    assert after - before < 1_000_000, (before, after)


def test_the_expiring_cache_answers_within_its_ttl_and_evicts_the_oldest() -> None:
    now = [100.0]
    cache: ExpiringCache[int] = ExpiringCache(3, ttl=10.0, clock=lambda: now[0])
    for n in range(3):
        cache[f"k{n}"] = n
    assert cache.get("k0") == 0
    cache["k3"] = 3  # full: the one stored longest ago goes, even if used lately
    assert cache.get("k0") is None
    assert [key for key, _ in cache.items()] == ["k1", "k2", "k3"]
    cache["k1"] = 11  # stored again: the newest now
    cache["k4"] = 4
    assert "k2" not in cache
    assert cache.get("k1") == 11
    now[0] += 10.0  # every entry stored at 100.0 has expired
    assert cache.get("k3") is None
    assert len(cache) == 2  # k1 and k4 are still held until looked up, and expired too
    assert cache.items() == []
    assert cache.pop("k4") == 4
    assert cache.pop("k4", -1) == -1
