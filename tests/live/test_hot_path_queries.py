"""The hot-path budget that is not about time (docs/performance.md): for a key already in the snapshot,
a request makes no database query, and exactly one Redis round trip when Redis is configured.

The gateway runs in this process (``gateway.conf.asgi.application`` driven by a minimal ASGI harness, so
anything later mounted in front of the data plane is covered too) against the real fake upstream.
Usage metering stays on, but its database writes are moved out of the counted window, since they are
off the request path by design (a gateway's usage writer is a child process, gateway/metering/writer.py,
which this in-process harness does not start: it would not see pytest's test database): the usage
writer is off, records wait in the journal (embedded) or the Redis stream, and ``manage.py usage_drain
--once`` writes them after the window. The test then checks every request was recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connections
from django.db.backends.signals import connection_created
from django.test import override_settings

from tests.conftest import MODEL, FakeUpstream, make_actor
from tests.harness import poll, poll_async

REQUESTS = 50
# Database writes of usage records happen after the counted window (see the module docstring).
USAGE_WRITES_DEFERRED = {"GATEWAY_USAGE_FLUSH_SECONDS": 3600.0, "GATEWAY_USAGE_DRAINER": False}
# Checked on every request, never reached: the limit checks run as they would in production.
GENEROUS_LIMITS = {"rpm": 100_000_000, "tpm": 10**15, "concurrency": 100_000, "budget_tokens": 10**17}


class QueryCounter:
    """Counts SQL statements on every connection of every thread while enabled.

    The gateway touches the database from worker threads (``sync_to_async(thread_sensitive=False)``),
    each with its own connection object: a wrapper on the test thread's connection alone would miss
    them. New connections get the wrapper through ``connection_created``; existing ones directly.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.statements: list[str] = []
        self._installed: list[contextlib.AbstractContextManager[None]] = []

    def __call__(self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        if self.enabled:
            self.statements.append(sql)
        return execute(sql, params, many, context)

    def _install(self, connection: Any) -> None:
        if self not in connection.execute_wrappers:
            wrapper = connection.execute_wrapper(self)
            wrapper.__enter__()
            self._installed.append(wrapper)

    def _on_connection_created(self, sender: Any, connection: Any, **kwargs: Any) -> None:
        self._install(connection)

    @contextlib.contextmanager
    def installed(self) -> Iterator[QueryCounter]:
        for connection in connections.all():
            self._install(connection)
        connection_created.connect(self._on_connection_created)
        try:
            yield self
        finally:
            connection_created.disconnect(self._on_connection_created)
            # Wrappers of worker-thread connections stay with those (finished) threads; disabled, they
            # only pass calls through.
            self.enabled = False
            for wrapper in self._installed:
                with contextlib.suppress(Exception):
                    wrapper.__exit__(None, None, None)


@contextlib.contextmanager
def worker_connections_closed() -> Iterator[None]:
    """Close the connections the gateway opened in worker threads when the block ends.

    Their threads are gone by then but the connections would linger, and PostgreSQL refuses to drop
    the test database while a session is open.
    """
    opened: list[Any] = []
    main_thread = threading.get_ident()

    def record(sender: Any, connection: Any, **kwargs: Any) -> None:
        if threading.get_ident() != main_thread:
            opened.append(connection)

    connection_created.connect(record)
    try:
        yield
    finally:
        connection_created.disconnect(record)
        for connection in opened:
            connection.inc_thread_sharing()  # closing from this thread is safe: its own thread has ended
            connection.close()


async def call(app: Any, key: str, payload: dict[str, Any]) -> tuple[int, bytes]:
    """One request through the ASGI app; the client stays connected until the response is complete."""
    body = orjson.dumps(payload)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/responses",
        "raw_path": b"/v1/responses",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    finished = asyncio.Event()
    sent_body = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                finished.set()

    await app(scope, receive, send)
    finished.set()
    return status, b"".join(chunks)


def payload(n: int) -> dict[str, Any]:
    # Alternate plain and streamed requests: both paths must stay off the database.
    return {"model": MODEL, "input": f"request {n}", "stream": n % 2 == 1}


def check(status: int, content: bytes, n: int) -> None:
    assert status == 200, f"request {n}: {status} {content[:300]!r}"
    if payload(n)["stream"]:
        assert b"response.completed" in content, content[-300:]


@pytest.fixture
def gateway_setup(fake_upstream: FakeUpstream) -> str:
    """A tenant and key (with limits where the models have them) and an account on the fake upstream."""
    from accounts import services as account_services
    from tenancy.models import ApiKey, Tenant

    actor = make_actor("hotpath")
    for model, pk in ((Tenant, actor.tenant.pk), (ApiKey, actor.api_key.pk)):
        names = {f.name for f in model._meta.get_fields() if getattr(f, "concrete", False)}
        limits = {name: value for name, value in GENEROUS_LIMITS.items() if name in names}
        model.objects.filter(pk=pk).update(**limits)
    from gateway.config import notify

    notify.config_changed()  # queryset updates fire no signal
    pool = account_services.pool_get_or_create(name="hotpath")
    account_services.upstream_account_create(pool=pool, base_url=fake_upstream.base_url, models=[MODEL])
    return actor.key


async def membership_loaded() -> None:
    """Wait for the key directory's membership set, which the runtime reads in the background a
    second after its first snapshot (two queries that belong to no request, and which a loaded
    machine could otherwise push into the counted window)."""
    from gateway.dataplane.app import gateway_app

    runtime = await gateway_app.ready_runtime()
    await poll_async(lambda: runtime.config.keys.members is not None, what="the key membership set")


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[None]:
    """The ASGI lifespan around a block: the app builds its runtime at start-up (with the settings
    in force then) and closes it at shutdown, writing its buffered usage records."""
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
    task = asyncio.ensure_future(app(scope, messages.get, replies.put))
    await messages.put({"type": "lifespan.startup"})
    assert (await replies.get())["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await messages.put({"type": "lifespan.shutdown"})
        assert (await replies.get())["type"] == "lifespan.shutdown.complete"
        await task


@pytest.mark.django_db(transaction=True)
def test_cached_key_requests_make_no_database_query(gateway_setup: str, tmp_path: Path) -> None:
    from gateway.conf.asgi import application
    from tenancy.models import UsageRecord

    key = gateway_setup
    counter = QueryCounter()

    async def main() -> None:
        async with serving(application):
            # Warm-up: loads the snapshot (those queries are allowed).
            check(*await call(application, key, payload(0)), 0)
            check(*await call(application, key, payload(1)), 1)
            await membership_loaded()
            counter.enabled = True
            for n in range(2, 2 + REQUESTS):
                check(*await call(application, key, payload(n)), n)
            counter.enabled = False

    # A journal of its own: live gateways' usage writers drain the session's data directory.
    private = override_settings(DATA_DIR=tmp_path)
    with private, worker_connections_closed(), override_settings(**USAGE_WRITES_DEFERRED), counter.installed():
        asyncio.run(main())
    assert counter.statements == [], f"{len(counter.statements)} queries on the hot path: {counter.statements[:5]}"
    # Metering was on all along: every request left a usage record once the journal (or the stream)
    # is drained.
    with override_settings(DATA_DIR=tmp_path), worker_connections_closed():  # Redis: drained from worker threads
        call_command("usage_drain", "--once")
    # With Redis, the session's running gateways drain the same stream: some records may be theirs
    # to write, a moment later.
    usage_written_and_quiet(REQUESTS + 2, tenant__slug="hotpath")
    assert UsageRecord.objects.filter(tenant__slug="hotpath").count() == REQUESTS + 2


class RoundTripProxy:
    """A TCP proxy in front of Redis counting round trips: client bursts that follow a server reply.

    A pipeline of several commands sent together is one round trip (Redis' own command counters would
    count each command), and only the gateway's connections pass here, whatever else uses that Redis.
    Each round trip is kept as its first bytes (what it asked).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.trips: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.handlers: list[asyncio.Task[Any]] = []

    @property
    def round_trips(self) -> int:
        return len(self.trips)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening, close both ends of every connection and let the handlers finish."""
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.append(task)
        server_reader, server_writer = await asyncio.open_connection(self.host, self.port)
        self.writers += [client_writer, server_writer]
        waiting = False  # a request was sent and its reply has not started

        async def upstream() -> None:
            nonlocal waiting
            while data := await client_reader.read(65536):
                if not waiting:
                    self.trips.append(data[:200])
                    waiting = True
                server_writer.write(data)
                await server_writer.drain()
            server_writer.close()

        async def downstream() -> None:
            nonlocal waiting
            while data := await server_reader.read(65536):
                waiting = False
                client_writer.write(data)
                await client_writer.drain()
            client_writer.close()

        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.gather(upstream(), downstream())


def redis_url_through(proxy_port: int) -> str:
    """settings.REDIS_URL with its host and port replaced by the proxy's."""
    parts = urlsplit(settings.REDIS_URL)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{proxy_port}" if userinfo else f"127.0.0.1:{proxy_port}"
    return urlunsplit(parts._replace(netloc=netloc))


# What a pooled connection sends once when it opens: set-up, not part of the requests it later serves.
CONNECTION_SETUP = (b"HELLO", b"AUTH", b"SELECT", b"CLIENT")


# Read by background tasks on their own clock: the live feed's check for a watcher (EXISTS of
# its key) and the metrics sampler's usage backlog (EXISTS, XINFO GROUPS, XLEN of the stream) and
# Redis latency (PING).
BACKGROUND_READS = (b"EXISTS", b"XINFO", b"XLEN", b"PING")


def off_request_path(data: bytes) -> bool:
    """A round trip no request pays: a new connection's set-up, a background batch of the settle
    script (settlements and binding writes that no admission carried within 20 ms), or a
    background task's read (``BACKGROUND_READS``)."""
    from gateway.limits.redis_backend import SETTLE_LUA

    parts = data.split(b"\r\n")
    command = parts[2].upper() if len(parts) > 2 else b""
    return (
        command in CONNECTION_SETUP
        or command in BACKGROUND_READS
        or hashlib.sha1(SETTLE_LUA.encode()).hexdigest().encode() in data
    )


def usage_written_and_quiet(at_least: int, **lookup: Any) -> None:
    """Wait until at least ``at_least`` usage records match ``lookup`` and no more arrive for 1 s."""
    from tenancy.models import UsageRecord

    def count() -> int:
        return UsageRecord.objects.filter(**lookup).count()

    poll(lambda: count() >= at_least, what=f"{at_least} usage records")
    last = -1
    while (now := count()) != last:
        last = now
        time.sleep(1.0)


@pytest.mark.skipif(not settings.REDIS_URL, reason="REDIS_URL is not set: the embedded mode uses no Redis")
@pytest.mark.django_db(transaction=True)
def test_one_redis_round_trip_per_request_of_every_kind(gateway_setup: str) -> None:
    """Each request makes exactly one Redis round trip while it runs, whatever its kind: without a
    prompt_cache_key, with a new one (its sticky binding is looked up in that same round trip, and
    written by a later one), with a known one, streamed or not, and refused by a limit (429).

    Settlements and binding writes ride on the next request's round trip; when none comes within
    20 ms, a background batch (the settle script) sends them: such batches are not part of any
    request, nor is the set-up of a pooled connection (once per connection, e.g. when a background
    batch overlapped an admission), so both are left out of the per-request count (on a quiet
    machine there are none), and nothing else may happen.
    """
    from gateway.conf.asgi import application

    key = gateway_setup
    limited = make_actor("hotpath-limited", rpm=1).key  # its first request passes, the others get 429
    if urlsplit(settings.REDIS_URL).scheme != "redis" or urlsplit(settings.REDIS_URL).hostname is None:
        pytest.skip(f"the round-trip proxy handles redis:// URLs only, not {settings.REDIS_URL.split(':')[0]}://")
    parts = urlsplit(settings.REDIS_URL)
    proxy = RoundTripProxy(parts.hostname or "", parts.port or 6379)
    kinds = {
        "no cache key": lambda n: payload(n),
        "new cache key": lambda n: {**payload(n), "prompt_cache_key": f"conversation-{n}"},
        "known cache key": lambda n: {**payload(n), "prompt_cache_key": "conversation-known"},
    }
    per_request: dict[str, list[int]] = {kind: [] for kind in [*kinds, "refused by a limit"]}
    others: list[bytes] = []

    async def request(kind: str, n: int, api_key: str, body: dict[str, Any], expected: int) -> None:
        started = proxy.round_trips
        status, content = await call(application, api_key, body)
        assert status == expected, f"{kind} {n}: {status} {content[:300]!r}"
        if expected == 200 and body["stream"]:
            assert b"response.completed" in content, content[-300:]
        trips = [data for data in proxy.trips[started:] if not off_request_path(data)]
        per_request[kind].append(len(trips))
        others.extend(trips[1:])

    async def main() -> None:
        try:
            async with serving(application):
                # Warm-up: connects (HELLO/SELECT/CLIENT SETINFO are per connection), loads the snapshot
                # and the scripts, binds "conversation-known" and uses up the limited key's minute.
                check(*await call(application, limited, payload(0)), 0)
                for n in range(2):
                    for body in kinds.values():
                        check(*await call(application, key, body(n)), n)
                await membership_loaded()
                for n in range(2, 2 + REQUESTS):
                    for kind, body in kinds.items():
                        await request(kind, n, key, body(n), 200)
                    await request("refused by a limit", n, limited, payload(n), 429)
        finally:
            await proxy.close()

    async def run() -> None:
        port = await proxy.start()
        with override_settings(REDIS_URL=redis_url_through(port), **USAGE_WRITES_DEFERRED):
            await main()

    with worker_connections_closed():
        asyncio.run(run())
        # Every record is in the database before the test's teardown empties it (the session's
        # running gateways drain the same stream, and their writes would race the flush).
        call_command("usage_drain", "--once")
        usage_written_and_quiet(tenant__slug__startswith="hotpath", at_least=3 * (REQUESTS + 2))
    for kind, counts in per_request.items():
        assert counts == [1] * REQUESTS, f"{kind}: Redis round trips per request {per_request} {others}"
    assert others == [], f"round trips besides the admission: {others[:5]}"
