"""The Redis path of metering (gateway/metering/stream.py): sink -> stream -> drainer -> writer.

Stream tests skip when REDIS_URL is not set; each uses its own stream name and deletes
it. Writers are plain functions standing in for ``usage_records_write``; one test runs
the management command against the real one.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from gateway.metering.codec import decode_event, encode_event
from gateway.metering.database import UsageWriteFailed
from gateway.metering.drain import drain
from gateway.metering.stream import FIELD, RedisUsageSink, StreamSource, UsageDrainer

REDIS_URL = os.environ.get("REDIS_URL", "")
T0 = datetime(2030, 1, 1, tzinfo=UTC)


# The fields of a complete usage event (with a tenant id filled in by the test).
FULL_EVENT: dict[str, Any] = {
    "api_key_id": None,
    "account_id": None,
    "status_code": 200,
    "outcome": "completed",
    "stream": False,
    "latency_ms": 1.5,
    "ttfb_ms": None,
    "input_tokens": 3,
    "output_tokens": 4,
    "total_tokens": 7,
}


def event(request_id: str, **extra: Any) -> dict[str, Any]:
    return {"request_id": request_id, "tenant_id": 1, "model": "m", "created_at": T0, **extra}


class FakeWriter:
    """Records what it was given; raises while ``down`` or for request ids in ``refuse``."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.down = False
        self.refuse: set[str] = set()
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, events: Any) -> int:
        with self._lock:
            self.calls += 1
            if self.down:
                raise ConnectionError("database is down")
            if any(e["request_id"] in self.refuse for e in events):
                raise ValueError("bad event")
            self.events.extend(events)
            return len(events)

    def ids(self) -> Counter[str]:
        return Counter(e["request_id"] for e in self.events)


@pytest.fixture
def stream() -> Iterator[str]:
    if not REDIS_URL:
        pytest.skip("REDIS_URL is not set")
    name = f"gwtest:{uuid.uuid4().hex}:usage"
    yield name
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.delete(name, name + ":dead")
    client.close()


def client() -> Any:
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(REDIS_URL)


async def fill(redis: Any, stream: str, count: int, prefix: str = "r") -> None:
    sink = RedisUsageSink(redis, stream=stream, max_batch=100)
    for n in range(count):
        sink.record(event(f"{prefix}{n}"))
    await sink.aclose()
    assert sink.written == count


def test_events_encode_datetimes_and_decimals_as_strings() -> None:
    data = encode_event(event("r1", cost=Decimal("0.000123"), ttfb_ms=None))
    decoded = decode_event(data)
    assert decoded["created_at"] == "2030-01-01T00:00:00+00:00"
    assert decoded["cost"] == "0.000123"
    assert decoded["ttfb_ms"] is None
    with pytest.raises(ValueError, match="JSON object"):
        decode_event(b"[1]")


def test_every_event_reaches_the_writer_exactly_once(stream: str) -> None:
    writer = FakeWriter()

    async def main() -> None:
        redis = client()
        await fill(redis, stream, 1200)
        assert await redis.xlen(stream) == 1200
        a = UsageDrainer(redis, writer, stream=stream, batch=250)
        b = UsageDrainer(redis, writer, stream=stream, batch=250)
        # Two consumers of the group share the work.
        counts = await asyncio.gather(a.drain(), b.drain())
        assert sum(counts) == 1200
        assert await a.drain() == 0
        pending = await redis.xpending(stream, a.group)
        assert pending["pending"] == 0
        await a.housekeeping()
        assert await redis.xlen(stream) == 0  # acknowledged entries are trimmed
        await redis.aclose()

    asyncio.run(main())
    assert len(writer.events) == 1200
    assert set(writer.ids().values()) == {1}
    assert writer.events[0]["created_at"] == "2030-01-01T00:00:00+00:00"


def test_database_outage_keeps_entries_pending_until_it_recovers(stream: str) -> None:
    writer = FakeWriter()
    writer.down = True

    async def main() -> None:
        redis = client()
        await fill(redis, stream, 30)
        drainer = UsageDrainer(redis, writer, stream=stream, batch=10)
        with pytest.raises(UsageWriteFailed):
            await drainer.step(block=False)
        with pytest.raises(UsageWriteFailed):
            await drainer.step(block=False)  # retries its own pending entries first
        assert (await redis.xpending(stream, drainer.group))["pending"] == 10
        await drainer.housekeeping()
        assert await redis.xlen(stream) == 30  # nothing unacknowledged is trimmed
        writer.down = False
        assert await drainer.drain() == 30
        assert (await redis.xpending(stream, drainer.group))["pending"] == 0
        await redis.aclose()

    asyncio.run(main())
    assert sorted(writer.ids()) == sorted(f"r{n}" for n in range(30))
    assert set(writer.ids().values()) == {1}


def test_the_drain_loop_backs_off_through_an_outage(stream: str) -> None:
    writer = FakeWriter()
    writer.down = True

    async def main() -> None:
        redis = client()
        await fill(redis, stream, 25)
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            drain(
                StreamSource(UsageDrainer(redis, writer, stream=stream, batch=10, block_ms=20)),
                stop,
                idle=0.01,
                max_backoff=0.05,
            )
        )
        while writer.calls < 3:
            await asyncio.sleep(0.01)
        assert writer.events == []
        writer.down = False
        for _ in range(1000):
            if len(writer.events) == 25:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 10)
        await redis.aclose()

    asyncio.run(main())
    assert sorted(writer.ids()) == sorted(f"r{n}" for n in range(25))
    assert set(writer.ids().values()) == {1}


def test_entries_of_a_dead_consumer_are_taken_over(stream: str) -> None:
    writer = FakeWriter()

    async def main() -> None:
        redis = client()
        await fill(redis, stream, 20)
        dead = UsageDrainer(redis, writer, stream=stream, consumer="dead-consumer")
        await dead.ensure_group()
        # It read the entries, then its process died before writing them.
        delivered = await redis.xreadgroup(dead.group, "dead-consumer", {stream: ">"}, count=15)
        assert len(delivered[0][1]) == 15
        heir = UsageDrainer(redis, writer, stream=stream, claim_idle_ms=0)
        assert await heir.drain() == 20
        pending = await redis.xpending(stream, heir.group)
        assert pending["pending"] == 0
        await redis.aclose()

    asyncio.run(main())
    assert sorted(writer.ids()) == sorted(f"r{n}" for n in range(20))
    assert set(writer.ids().values()) == {1}


def test_live_consumers_keep_their_entries(stream: str) -> None:
    writer = FakeWriter()

    async def main() -> None:
        redis = client()
        await fill(redis, stream, 5)
        busy = UsageDrainer(redis, writer, stream=stream, consumer="busy")
        await busy.ensure_group()
        await redis.xreadgroup(busy.group, "busy", {stream: ">"}, count=5)
        other = UsageDrainer(redis, writer, stream=stream)  # claim_idle_ms: a minute
        assert await other.drain() == 0
        assert (await redis.xpending(stream, busy.group))["pending"] == 5
        await redis.aclose()

    asyncio.run(main())
    assert writer.events == []


def test_a_refused_event_is_set_aside_and_the_rest_written(stream: str) -> None:
    writer = FakeWriter()
    writer.refuse = {"r3"}

    async def main() -> None:
        redis = client()
        await fill(redis, stream, 8)
        await redis.xadd(stream, {FIELD: b"not json"})
        drainer = UsageDrainer(redis, writer, stream=stream)
        assert await drainer.drain() == 9
        assert (await redis.xpending(stream, drainer.group))["pending"] == 0
        dead = await redis.xrange(drainer.dead_stream)
        bodies = sorted(fields[FIELD] for _, fields in dead)
        assert bodies[0] == b"not json"
        assert decode_event(bodies[1])["request_id"] == "r3"
        assert sorted(writer.ids()) == sorted(f"r{n}" for n in range(8) if n != 3)
        # Once the cause is fixed, the refused event goes back and is written.
        writer.refuse = set()
        assert await drainer.requeue_dead() == 2
        assert await drainer.drain() == 2
        assert writer.ids()["r3"] == 1
        assert [fields[FIELD] for _, fields in await redis.xrange(drainer.dead_stream)] == [b"not json"]
        await redis.aclose()

    asyncio.run(main())


def test_sink_spools_when_redis_is_unreachable_and_replays_later(stream: str, tmp_path: Path) -> None:
    import redis.asyncio as aioredis

    spool = tmp_path / "spool"
    writer = FakeWriter()

    async def offline() -> None:
        unreachable = "redis://127.0.0.1:1/0"
        redis = aioredis.Redis.from_url(unreachable, socket_connect_timeout=0.5)
        sink = RedisUsageSink(redis, stream=stream, url=unreachable, spool_dir=spool)
        for n in range(7):
            sink.record(event(f"s{n}"))
        await sink.aclose()
        await redis.aclose()

    async def online() -> None:
        redis = client()
        sink = RedisUsageSink(redis, stream=stream, url=REDIS_URL, spool_dir=spool, interval=0.01)
        sink.record(event("after"))  # starts the background task, which replays the spool
        for _ in range(1000):
            if await redis.xlen(stream) == 8:
                break
            await asyncio.sleep(0.01)
        await sink.aclose()
        assert await UsageDrainer(redis, writer, stream=stream).drain() == 8
        await redis.aclose()

    asyncio.run(offline())
    assert len(list(spool.glob("*.jsonl"))) == 1
    asyncio.run(online())
    assert list(spool.glob("*.jsonl")) == []
    assert sorted(writer.ids()) == sorted([*(f"s{n}" for n in range(7)), "after"])


def test_sink_spools_a_long_outage_instead_of_growing(tmp_path: Path) -> None:
    import orjson
    import redis.asyncio as aioredis

    spool = tmp_path / "spool"
    unreachable = "redis://127.0.0.1:1/0"

    async def main() -> None:
        redis = aioredis.Redis.from_url(unreachable, socket_connect_timeout=0.5)
        sink = RedisUsageSink(redis, url=unreachable, spool_dir=spool, interval=0.01, max_buffer=5)
        for n in range(10):
            sink.record(event(f"o{n}"))
        assert sink.saturated  # until the spool takes them: the data plane answers 503
        for _ in range(1000):
            if sink.pending() == 0:
                break
            await asyncio.sleep(0.01)
        assert sink.pending() == 0  # moved to disk, not held in memory
        assert not sink.saturated
        await sink.aclose()
        await redis.aclose()

    asyncio.run(main())
    spooled = [orjson.loads(line) for path in spool.glob("*.jsonl") for line in path.read_bytes().splitlines()]
    assert sorted(e["request_id"] for e in spooled) == sorted(f"o{n}" for n in range(10))


def test_flush_sync_writes_without_an_event_loop(stream: str) -> None:
    import redis

    sink = RedisUsageSink(None, stream=stream, url=REDIS_URL)  # type: ignore[arg-type]
    sink.record(event("x1"))  # no running loop: stays buffered
    sink.flush_sync()
    sync = redis.Redis.from_url(REDIS_URL)
    assert sync.xlen(stream) == 1
    sync.close()


@pytest.mark.django_db(transaction=True)
def test_usage_drain_command_writes_to_the_database(stream: str, settings: Any) -> None:
    from tenancy.models import UsageRecord
    from tenancy.services.tenants import tenant_create

    settings.REDIS_URL = REDIS_URL
    tenant = tenant_create(slug="drained")
    full = {**FULL_EVENT, "tenant_id": tenant.pk}

    async def main() -> None:
        redis = client()
        sink = RedisUsageSink(redis, stream=stream)
        for n in range(3):
            sink.record(event(f"cmd{n}", **full))
        await sink.aclose()
        await redis.aclose()

    asyncio.run(main())
    call_command("usage_drain", "--once", "--stream", stream)
    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == ["cmd0", "cmd1", "cmd2"]
    assert UsageRecord.objects.get(request_id="cmd0").created_at == T0


@pytest.mark.django_db(transaction=True)  # the writer's connection hygiene closes a connection inside atomic()
def test_usage_drain_command_writes_the_journal_without_redis(settings: Any, tmp_path: Path) -> None:
    from gateway.metering.journal import JournalDrainer, JournalWriter
    from tenancy.models import Tenant, UsageRecord

    settings.REDIS_URL = ""
    settings.DATA_DIR = tmp_path  # not the session's directory, which live gateways' writers drain
    tenant = Tenant.objects.create(name="Journal", slug="journal")
    writer = JournalWriter(tmp_path / "usage-journal")
    for n in range(3):
        writer.record(event(f"jr{n}", **{**FULL_EVENT, "tenant_id": tenant.pk}))
    writer.flush_sync()
    # A gateway's writer process holds the journal: the command says so and writes nothing.
    active = JournalDrainer(tmp_path / "usage-journal")
    assert active.acquire()
    with pytest.raises(CommandError, match="draining the journal"):
        call_command("usage_drain", "--once")
    active.release()
    writer.close()
    call_command("usage_drain", "--once")
    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == ["jr0", "jr1", "jr2"]
    assert UsageRecord.objects.get(request_id="jr0").total_tokens == 7
    assert list((tmp_path / "usage-journal").glob("*.jsonl")) == []
