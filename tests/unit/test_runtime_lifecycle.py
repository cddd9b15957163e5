"""The data plane's process state (gateway/dataplane/runtime.py) and its owner, the app's lifespan.

Real parts: the runtime of the session's mode (in process, or on the test Redis), and a
real usage writer child process where one is started. Those runtimes run embedded
(``REDIS_URL`` emptied for the runtime and for its child): the child then drains a
journal of its own data directory (tests.settings makes one per process), which stays
empty, so it never writes to any database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import pytest

from gateway.dataplane.app import GatewayApp
from gateway.dataplane.runtime import Runtime
from tests import harness as live

WRITER_MODULE = "gateway.metering.writer"


def writer_children() -> list[int]:
    """This process's usage writer children, zombies included."""
    return [pid for pid in live.children(os.getpid()) if WRITER_MODULE in live.cmdline(pid)]


@pytest.fixture
def embedded_writer(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runtimes of this test are embedded and start a usage writer child (embedded too)."""
    settings.REDIS_URL = ""
    settings.GATEWAY_USAGE_DRAINER = True
    monkeypatch.setenv("REDIS_URL", "")


def others() -> set[asyncio.Task[Any]]:
    """The tasks of the running loop other than the caller's."""
    return asyncio.all_tasks() - {asyncio.current_task()}


def test_constructing_a_runtime_starts_nothing(embedded_writer: None) -> None:
    async def scenario() -> None:
        interval = sys.getswitchinterval()
        runtime = Runtime()
        assert others() == set()
        assert writer_children() == []
        assert sys.getswitchinterval() == interval, "no global setting changed"
        await runtime.aclose()

    asyncio.run(scenario())


def test_closing_a_runtime_closes_every_task_it_started(settings: Any) -> None:
    """Whatever the mode: the keep-alive ticker, background tasks, the stores' tasks."""
    settings.GATEWAY_USAGE_DRAINER = False  # the writer child has its own tests

    async def scenario() -> None:
        runtime = Runtime()
        await runtime.start()
        frames: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            frames.append(message)

        runtime.keepalive.register([send, 0.0])  # an idle stream: the ticker runs
        runtime.spawn(asyncio.sleep(3600))  # a background task, as a budget alert's
        await live.poll_async(lambda: frames)
        assert others()
        await runtime.aclose()
        assert others() == set(), "every task the runtime started is closed"

    asyncio.run(scenario())


def test_a_dead_usage_writer_is_reported_in_readiness_until_its_replacement_runs(embedded_writer: None) -> None:
    async def scenario() -> None:
        runtime = Runtime()
        await runtime.start()
        try:
            [pid] = writer_children()
            assert runtime.readiness.report() == {"status": "ok", "down": {}}
            os.kill(pid, signal.SIGKILL)
            await live.poll_async(lambda: runtime.readiness.is_down("usage_writer"))
            report: Any = runtime.readiness.report()
            assert report["status"] == "degraded"
            reason = report["down"]["usage_writer"]["reason"]
            assert reason.startswith(f"the usage writer (pid {pid}) exited with status -9; restarting in")
            await live.poll_async(lambda: not runtime.readiness.is_down("usage_writer"))
            assert runtime.readiness.report() == {"status": "ok", "down": {}}
            [replacement] = writer_children()
            assert replacement != pid
        finally:
            await runtime.aclose()
        assert writer_children() == [], "stopped and reaped"

    asyncio.run(scenario())


def test_the_lifespan_starts_the_runtime_and_closes_it_with_its_writer(embedded_writer: None) -> None:
    async def scenario() -> None:
        app = GatewayApp()
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        sent: list[str] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message["type"])

        lifespan = asyncio.create_task(app({"type": "lifespan"}, inbox.get, send))
        await inbox.put({"type": "lifespan.startup"})
        await live.poll_async(lambda: sent)
        assert sent == ["lifespan.startup.complete"]
        assert app.runtime is not None
        assert len(writer_children()) == 1
        await inbox.put({"type": "lifespan.shutdown"})
        await lifespan
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert writer_children() == []
        assert others() == set()

    asyncio.run(scenario())


@pytest.mark.django_db(transaction=True)
def test_closing_a_runtime_closes_its_configuration_tasks_and_logs_failures(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The snapshot's background work (the key membership load, a reload) is closed with the
    runtime, and a background task's failure is logged, not swallowed (issue 10 item 22)."""
    settings.GATEWAY_USAGE_DRAINER = False

    async def fail() -> None:
        raise RuntimeError("a background failure")

    async def scenario() -> None:
        runtime = Runtime()
        await runtime.start()
        await runtime.config.current()  # starts the membership load in the background
        runtime.spawn(fail())
        runtime.spawn(asyncio.sleep(3600))
        await asyncio.sleep(0)
        await runtime.aclose()
        assert others() == set(), "every task the runtime started is closed"

    asyncio.run(scenario())
    assert "background task failed" in caplog.text
    assert "a background failure" in caplog.text
