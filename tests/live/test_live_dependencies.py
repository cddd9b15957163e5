"""Dependency outages through a live gateway: what clients and readiness see (issue 10, item 1).

Redis and the database are reached through a :class:`TcpRelay` that the test cuts (new
connections refused, open ones closed) and restores on the same port.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from tests import harness as live
from tests.conftest import MODEL, Live
from tests.harness import TcpRelay, assert_error, poll

pytestmark = pytest.mark.live


@pytest.fixture
def private_redis() -> Iterator[int]:
    """A Redis server of this test's own (the session's, if any, is never cut off)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    import redis

    port = live.free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)

    def answers() -> bool:
        with contextlib.suppress(redis.exceptions.ConnectionError):
            return bool(client.ping())
        return False

    try:
        poll(answers, what="the private Redis answering")
        yield port
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


def responses(gateway: live.LiveProcess, key: str, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "input": "hi", **fields}
    return httpx.post(gateway.url + "/v1/responses", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)


def usage(gateway: live.LiveProcess, key: str) -> httpx.Response:
    return httpx.get(gateway.url + "/v1/usage", headers={"authorization": f"Bearer {key}"}, timeout=30)


def readyz(gateway: live.LiveProcess) -> httpx.Response:
    return httpx.get(gateway.url + "/readyz", timeout=10)


def assert_unavailable(response: httpx.Response) -> None:
    assert_error(response, 503, "service_unavailable", type="server_error")
    assert int(response.headers["retry-after"]) >= 1


def test_redis_outage_is_503_with_retry_after_logged_once_and_reported_by_readiness(
    live_gw: Live, start_gateway: Callable[..., live.LiveProcess], private_redis: int
) -> None:
    relay = TcpRelay("127.0.0.1", private_redis).restore()
    try:
        gateway = start_gateway(REDIS_URL=f"redis://127.0.0.1:{relay.port}/0")
        assert responses(gateway, live_gw.owner.key).status_code == 200
        ready = readyz(gateway)
        assert (ready.status_code, ready.json()["down"], ready.json()["serving"]) == (200, {}, True)
        assert httpx.get(gateway.url + "/healthz", timeout=10).status_code == 200

        relay.cut()
        for _ in range(5):  # a valid request, a bad key, an unknown model, the usage endpoint
            assert_unavailable(responses(gateway, live_gw.owner.key))
            assert_unavailable(responses(gateway, "sk-gw-not-a-key"))
            assert_unavailable(responses(gateway, live_gw.owner.key, model="no-such-model"))
            assert_unavailable(usage(gateway, live_gw.owner.key))
        ready = readyz(gateway)
        assert ready.status_code == 503
        assert ready.json()["down"]["redis"]["reason"] == "ConnectionError"
        assert ready.json()["serving"] is False
        assert httpx.get(gateway.url + "/healthz", timeout=10).status_code == 200  # liveness: still alive

        relay.restore()
        poll(lambda: readyz(gateway).status_code == 200, what="readiness after Redis returned")
        assert readyz(gateway).json()["down"] == {}
        assert responses(gateway, live_gw.owner.key).status_code == 200
    finally:
        relay.cut()
    log = gateway.log.read_text(errors="replace")
    assert log.count("redis is unavailable") == 1, log[-3000:]
    assert log.count("redis is available again") == 1, log[-3000:]
    assert "unhandled error" not in log, log[-3000:]


def _through(relay: TcpRelay, url: str) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{relay.port}" if userinfo else f"127.0.0.1:{relay.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _database_relay(database_url: str) -> TcpRelay:
    """A relay in front of the test's PostgreSQL (the test is skipped on SQLite, a local file)."""
    parts = urlsplit(database_url)
    if parts.scheme != "postgres":
        pytest.skip("a database outage is simulated for PostgreSQL (SQLite is a local file)")
    return TcpRelay(parts.hostname or "127.0.0.1", parts.port or 5432).restore()


def test_database_outage_keeps_responses_serving_and_usage_is_503(
    live_gw: Live, live_env: dict[str, str], start_gateway: Callable[..., live.LiveProcess]
) -> None:
    database_url = live_env["DATABASE_URL"]
    relay = _database_relay(database_url)
    try:
        gateway = start_gateway(DATABASE_URL=_through(relay, database_url))
        assert responses(gateway, live_gw.owner.key).status_code == 200
        assert usage(gateway, live_gw.owner.key).status_code == 200

        relay.cut()
        for _ in range(3):
            assert responses(gateway, live_gw.owner.key).status_code == 200  # on the current snapshot
            # A key whose figures are not cached (the owner's are, for 5 s).
            assert_unavailable(usage(gateway, live_gw.outsider.key))
        ready = readyz(gateway)
        assert ready.status_code == 200  # requests are still served
        assert "database" in ready.json()["down"]
        assert ready.json()["serving"] is True

        relay.restore()
        poll(lambda: usage(gateway, live_gw.outsider.key).status_code == 200, what="/v1/usage after the database")
        assert "database" not in readyz(gateway).json()["down"]
    finally:
        relay.cut()
    log = gateway.log.read_text(errors="replace")
    assert log.count("database is unavailable") == 1, log[-3000:]
    assert "unhandled error" not in log, log[-3000:]


def test_a_silent_database_and_a_config_change_leave_requests_answered_from_the_last_snapshot(
    live_gw: Live, live_env: dict[str, str], start_gateway: Callable[..., live.LiveProcess]
) -> None:
    """A database that accepts connections and never answers, plus a configuration change:
    every request with a known key is still answered at once from the last snapshot (issue 10
    item 2: on main each waited for its own reload, 100 of 100 timed out at the client), the
    outage is logged once and reported by readiness, and the gateway follows the change once
    the database answers again."""
    import time

    from gateway.config import notify

    database_url = live_env["DATABASE_URL"]
    relay = _database_relay(database_url)
    try:
        gateway = start_gateway(
            DATABASE_URL=_through(relay, database_url),
            GATEWAY_DB_CONNECT_TIMEOUT="2",
            GATEWAY_DB_STATEMENT_TIMEOUT="2",
        )
        assert responses(gateway, live_gw.owner.key).status_code == 200  # snapshot and key loaded
        relay.silence()
        notify.config_changed()
        started = time.monotonic()
        codes = [responses(gateway, live_gw.owner.key).status_code for _ in range(30)]
        elapsed = time.monotonic() - started
        assert codes == [200] * 30
        # Generous: the first request waits up to 1 s for the reload, the others not at all.
        assert elapsed < 10, elapsed
        assert "database" in readyz(gateway).json()["down"]
        relay.cut()
        relay.restore()

        def followed() -> bool:  # requests start the reload (the stuck one is abandoned after 4 s)
            assert responses(gateway, live_gw.owner.key).status_code == 200
            return "database" not in readyz(gateway).json()["down"]

        poll(followed, timeout=30, interval=0.2, what="the reload once the database answers")
    finally:
        relay.cut()
    log = gateway.log.read_text(errors="replace")
    assert log.count("database is unavailable") == 1, log[-3000:]
    assert "unhandled error" not in log, log[-3000:]
