"""The usage writer child process (gateway/metering/writer.py) of live gateways.

Each gateway process spawns one ``python -m gateway.metering.writer`` whose stdin is its
lifeline: when the gateway exits (SIGTERM: after its last append) or dies (SIGKILL), the
child writes what is left and exits. These tests find the child through /proc.

Gateways started here get a data directory of their own: in embedded mode their journal
then has no other drainer than their own child (the session gateway's writer drains the
shared one), so what reaches the database was written by that child. With Redis the
child drains the shared usage stream next to the other gateways' writers, and records
may be written by any of them, so those tests poll.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings

from gateway.metering.codec import decode_event
from gateway.metering.journal import DEAD_NAME, JournalDrainer, JournalWriter
from tests import harness as live
from tests.conftest import DATA_DIR, MODEL, Live, make_actor

pytestmark = pytest.mark.live

WRITER_MODULE = "gateway.metering.writer"
EMBEDDED = not settings.REDIS_URL


def usage_writers(gateway: live.LiveProcess) -> list[int]:
    assert gateway.proc is not None
    return [pid for pid in live.children(gateway.proc.pid) if WRITER_MODULE in live.cmdline(pid)]


def usage_writer_of(gateway: live.LiveProcess) -> live.Child:
    """The gateway's one usage writer child (waiting for it: Daphne starts it at the first request)."""
    [pid] = live.poll(lambda: usage_writers(gateway), what="a usage writer child")
    assert gateway.proc is not None
    assert live.children(gateway.proc.pid) == [pid], "the gateway has no other child"
    assert live.cmdline(pid)[1:] == ["-m", WRITER_MODULE]
    return live.Child.of(pid)


# --- requests and where their records are -----------------------------------------------------


def post(gateway: live.LiveProcess, key: str, text: str, *, stream: bool = False) -> str:
    """One successful request; returns its request id."""
    response = httpx.post(
        gateway.url + "/v1/responses",
        json={"model": MODEL, "input": text, "stream": stream},
        headers={"authorization": f"Bearer {key}"},
        timeout=20,
    )
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"]


def recorded(request_ids: list[str]) -> set[str]:
    from tenancy.models import UsageRecord

    return set(UsageRecord.objects.filter(request_id__in=request_ids).values_list("request_id", flat=True))


def segments(journal: Path) -> list[Path]:
    return sorted(path for path in journal.glob("*.jsonl") if path.name != DEAD_NAME)


def in_journal(journal: Path) -> set[str]:
    """Request ids of the complete lines of the journal's segments."""
    found = set()
    for path in segments(journal):
        data = path.read_bytes()
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            found.add(str(decode_event(line)["request_id"]))
    return found


def in_stream() -> set[str]:
    """Request ids in the Redis usage stream (an entry leaves it only after the database has it)."""
    import redis

    from gateway.metering.stream import FIELD, STREAM

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        entries: list[Any] = client.xrange(STREAM) or []
        return {str(decode_event(fields[FIELD])["request_id"]) for _, fields in entries}
    finally:
        client.close()


def gateway_env(data_dir: Path, **env: str) -> dict[str, str]:
    return {"GATEWAY_DATA_DIR": str(data_dir), **env}


# --- the child of a gateway -------------------------------------------------------------------


@pytest.mark.parametrize("server", ["uvicorn", "daphne"])
def test_a_gateway_has_exactly_one_usage_writer_child(
    live_gw: Live, start_gateway: Callable[..., live.LiveProcess], tmp_path: Path, server: str
) -> None:
    gateway = start_gateway(server=server, **gateway_env(tmp_path / "data"))
    first = post(gateway, live_gw.owner.key, "first")
    writer = usage_writer_of(gateway)
    request_ids = [first] + [post(gateway, live_gw.owner.key, f"n{i}", stream=i % 2 == 1) for i in range(5)]
    # The same child for every request, not one per request.
    assert usage_writers(gateway) == [writer.pid]
    assert writer.running()
    for request_id in request_ids:
        live_gw.wait_usage(request_id)


@pytest.mark.parametrize("server", ["uvicorn", "daphne"])
def test_a_killed_usage_writer_is_reaped_restarted_and_reported(
    live_gw: Live, start_gateway: Callable[..., live.LiveProcess], tmp_path: Path, server: str
) -> None:
    """SIGKILL of the writer child: no zombie left, a new child takes over, records keep arriving."""
    gateway = start_gateway(server=server, **gateway_env(tmp_path / "data"))
    live_gw.wait_usage(post(gateway, live_gw.owner.key, "before"))
    writer = usage_writer_of(gateway)
    writer.signal(signal.SIGKILL)
    assert gateway.proc is not None
    parent = gateway.proc.pid
    # Reaped: not left a zombie (a zombie still shows among the parent's children).
    live.poll(lambda: writer.pid not in live.children(parent), what="the killed writer reaped")
    # Meanwhile the gateway keeps serving; the records wait and then reach the database.
    request_ids = [post(gateway, live_gw.owner.key, f"after {i}") for i in range(10)]
    replacement = usage_writer_of(gateway)
    assert replacement != writer
    for request_id in request_ids:
        live_gw.wait_usage(request_id)
    log = gateway.log.read_text()
    assert f"the usage writer (pid {writer.pid}) exited with status -9" in log
    # Readiness reported it down once, and up again once the replacement started.
    assert log.count(f"usage_writer is unavailable: the usage writer (pid {writer.pid}) exited") == 1
    assert "usage_writer is available again" in log


def test_sigkill_of_a_gateway_loses_no_usage(
    live_gw: Live, start_gateway: Callable[..., live.LiveProcess], tmp_path: Path
) -> None:
    journal = tmp_path / "data" / "usage-journal"
    # Embedded: this test holds the journal's drain lock, so the gateway's writer stands by
    # and the records stay in the journal until after the gateway is dead.
    holder = JournalDrainer(journal)
    assert not EMBEDDED or holder.acquire()
    try:
        gateway = start_gateway(**gateway_env(tmp_path / "data"))
        writer = usage_writer_of(gateway)
        request_ids = [post(gateway, live_gw.owner.key, f"n{i}", stream=i % 2 == 1) for i in range(10)]
        # With Redis the gateway XADDs within GATEWAY_USAGE_FLUSH_SECONDS of each response; a
        # SIGKILL before that loses what it held (docs/architecture.md), so wait for the records
        # to be out. (Embedded they are in the journal when the response ends.)
        if EMBEDDED:
            live.poll(lambda: set(request_ids) <= in_journal(journal), what="records in the journal")
            assert recorded(request_ids) == set()
        else:
            live.poll(lambda: set(request_ids) <= in_stream() | recorded(request_ids), what="records in Redis")
        writer.signal(signal.SIGSTOP)  # so that it notices the lifeline only once the gateway is gone
    finally:
        holder.release()
    try:
        assert gateway.stop(signal.SIGKILL) == -signal.SIGKILL
        if EMBEDDED:
            assert recorded(request_ids) == set(), "nothing but the stopped writer drains this journal"
    finally:
        writer.signal(signal.SIGCONT)
    # The orphaned writer's last pass (embedded), or any writer on the stream (Redis).
    live.poll(lambda: recorded(request_ids) == set(request_ids), timeout=30, what="all records written")
    live.poll(lambda: not writer.running(), timeout=30, what="the orphaned usage writer exiting")
    if EMBEDDED:
        assert segments(journal) == []
        assert not (journal / DEAD_NAME).exists()


def test_sigkill_right_after_the_responses_loses_no_usage_embedded(
    live_gw: Live, start_gateway: Callable[..., live.LiveProcess], tmp_path: Path
) -> None:
    """Embedded, a record is in the journal (the kernel's page cache) when its request ends:
    a SIGKILL right after the client has its answer loses nothing, with no wait first.
    (The gateway runs without Redis whatever the session's mode; see docs for Redis.)"""
    gateway = start_gateway(**gateway_env(tmp_path / "data", REDIS_URL=""))
    writer = usage_writer_of(gateway)
    request_ids = [post(gateway, live_gw.owner.key, f"n{i}", stream=i % 2 == 1) for i in range(10)]
    assert gateway.stop(signal.SIGKILL) == -signal.SIGKILL
    # The orphaned writer's last pass writes what the journal holds.
    live.poll(lambda: recorded(request_ids) == set(request_ids), timeout=30, what="all records written")
    live.poll(lambda: not writer.running(), timeout=30, what="the orphaned usage writer exiting")
    assert segments(tmp_path / "data" / "usage-journal") == []


@pytest.mark.parametrize(
    ("server", "signal_writer"),
    [("uvicorn", False), ("daphne", False), ("uvicorn", True)],
    ids=["uvicorn", "daphne", "process-group"],
)
def test_sigterm_of_a_gateway_writes_usage_and_ends_its_writer(
    live_gw: Live, start_gateway: Callable[..., live.LiveProcess], tmp_path: Path, server: str, signal_writer: bool
) -> None:
    # Embedded, records are in the journal at once, and this test holds the journal's drain
    # lock until the shutdown: the gateway's writer stands by meanwhile. With Redis, a flush
    # interval far beyond the test: only the sink's shutdown path can XADD these records.
    journal = tmp_path / "data" / "usage-journal"
    holder = JournalDrainer(journal)
    assert holder.acquire()
    try:
        gateway = start_gateway(server=server, **gateway_env(tmp_path / "data", GATEWAY_USAGE_FLUSH_SECONDS="60"))
        request_ids = [post(gateway, live_gw.owner.key, f"n{i}", stream=i % 2 == 1) for i in range(8)]
        writer = usage_writer_of(gateway)
        assert recorded(request_ids) == set(), "written before shutdown?"
    finally:
        holder.release()
    if signal_writer:
        # A Ctrl-C or a service manager signals the whole process group: the writer
        # ignores it and still does the last pass once the gateway has appended its records.
        writer.signal(signal.SIGINT)
        writer.signal(signal.SIGTERM)
    # uvicorn re-raises the SIGTERM after its graceful shutdown; a SIGKILL (-9) would mean it hung.
    assert gateway.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    if EMBEDDED:
        # The gateway waited for its writer's last pass, the only drainer of its journal.
        assert recorded(request_ids) == set(request_ids)
        assert not writer.running()
        assert segments(journal) == []
    else:
        # Pushed to the stream at shutdown; this writer or another one writes them.
        live.poll(lambda: recorded(request_ids) == set(request_ids), timeout=15, what="all records written")
        live.poll(lambda: not writer.running(), timeout=15, what="the usage writer exiting")


@pytest.mark.parametrize("server", ["uvicorn", "daphne"])
def test_a_stream_cut_by_the_shutdown_of_its_gateway_is_recorded(
    live_gw: Live, start_gateway: Callable[..., live.LiveProcess], tmp_path: Path, server: str
) -> None:
    """SIGTERM while a stream runs: Daphne cancels it at once, uvicorn after its graceful
    window (10 s); either way its record reaches the journal before the runtime closes."""
    gateway = start_gateway(server=server, **gateway_env(tmp_path / "data"))
    slow = {"fake_event_delay_ms": "200", "fake_tokens": "100"}  # ~20 s of events
    with httpx.stream(
        "POST",
        gateway.url + "/v1/responses",
        json={"model": MODEL, "input": "cut short", "stream": True, "metadata": slow},
        headers={"authorization": f"Bearer {live_gw.owner.key}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        chunks = response.iter_bytes()
        next(chunks)  # streaming
        assert gateway.stop(signal.SIGTERM, timeout=30) in (0, -signal.SIGTERM)
    live.poll(lambda: recorded([request_id]), timeout=30, what="the cut stream recorded")


# --- the child on its own ---------------------------------------------------------------------


@contextlib.contextmanager
def usage_writer_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m gateway.metering.writer`` with a lifeline on its stdin; killed if the test leaves it running."""
    with open(log, "ab") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", WRITER_MODULE],
            stdin=subprocess.PIPE,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=live.ROOT,
            env=env,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()


def usage_event(actor: Any, request_id: str) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "tenant_id": actor.tenant.id,
        "api_key_id": actor.api_key.id,
        "account_id": None,
        "model": MODEL,
        "status_code": 200,
        "outcome": "completed",
        "stream": False,
        "response_id": f"resp_{request_id}",
        "latency_ms": 12.5,
        "ttfb_ms": 3.25,
        "created_at": datetime.now(UTC),
        "input_tokens": 3,
        "output_tokens": 5,
        "total_tokens": 8,
        "cost": None,
        "price_version_id": None,
        "attempts": [],
    }


def test_the_usage_writer_drains_ignores_sigterm_and_exits_after_a_last_pass_at_eof(
    transactional_db: None, live_env: dict[str, str], tmp_path: Path
) -> None:
    owner = make_actor("owner")
    journal = tmp_path / "usage-journal"
    # Embedded whatever the session's mode: the child drains this journal, into the test database.
    env = {**live_env, "GATEWAY_DATA_DIR": str(tmp_path), "REDIS_URL": ""}
    appender = JournalWriter(journal)
    with usage_writer_process(env, DATA_DIR / "usage-writer.log") as proc:
        assert proc.stdin is not None
        ids = [f"req_writer_{i}" for i in range(7)]
        for request_id in ids[:3]:
            appender.record(usage_event(owner, request_id))
        appender.flush_sync()
        live.poll(lambda: recorded(ids) == set(ids[:3]), what="the first records written")

        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGINT)
        for request_id in ids[3:5]:
            appender.record(usage_event(owner, request_id))
        appender.flush_sync()
        live.poll(lambda: recorded(ids) == set(ids[:5]), what="records written after SIGTERM")
        assert proc.poll() is None

        for request_id in ids[5:]:
            appender.record(usage_event(owner, request_id))
        appender.close()
        proc.stdin.close()
        assert proc.wait(30) == 0
        assert recorded(ids) == set(ids), "the last records are written before it exits"
    assert segments(journal) == []
    assert not (journal / DEAD_NAME).exists()


def test_a_standby_usage_writer_leaves_the_journal_to_the_active_drainer(tmp_path: Path) -> None:
    journal = tmp_path / "usage-journal"
    appender = JournalWriter(journal)
    appender.record({"request_id": "req_standby", "tenant_id": 1, "model": MODEL})
    appender.close()
    [segment] = segments(journal)
    content = segment.read_bytes()
    active = JournalDrainer(journal)
    assert active.acquire()
    try:
        env = live.child_env(GATEWAY_DATA_DIR=str(tmp_path), REDIS_URL="")
        with usage_writer_process(env, DATA_DIR / "usage-writer.log") as proc:
            assert proc.stdin is not None
            proc.stdin.close()
            assert proc.wait(30) == 0
    finally:
        active.release()
    assert segments(journal) == [segment]
    assert segment.read_bytes() == content
