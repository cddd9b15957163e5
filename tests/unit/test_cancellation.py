"""Background loops end when cancelled, even when a library turns the cancellation into an ordinary
exception (accounts/infra/redis.py ``raise_if_cancelled``): before, such a loop logged it, went on,
and its owner's ``await task`` at shutdown hung the process (a uvicorn worker never exited)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from accounts.infra.redis import raise_if_cancelled
from gateway.metering.drain import drain


class Swallowing:
    """A usage source whose step, like redis-py in some states, turns a cancellation into
    ConnectionError."""

    name = "stream"

    def __init__(self) -> None:
        self.steps = 0
        self.finished = False

    async def step(self) -> int:
        self.steps += 1
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise ConnectionError("connection closed") from None
        return 0

    async def finish(self, wait: float) -> None:
        self.finished = True


def test_a_drain_loop_ends_when_cancelled_inside_a_call_that_hides_it() -> None:
    source = Swallowing()

    async def scenario() -> None:
        task = asyncio.ensure_future(drain(source, asyncio.Event(), idle=0.01))
        await asyncio.sleep(0.05)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done == {task}
        assert task.cancelled()

    asyncio.run(scenario())
    assert source.steps == 1  # not retried after the cancellation


def test_raise_if_cancelled_only_raises_for_a_cancelled_task() -> None:
    async def swallowing() -> str:
        with contextlib.suppress(asyncio.CancelledError):  # a library that hides it
            await asyncio.sleep(10)
        raise_if_cancelled()
        return "went on"

    async def scenario() -> tuple[bool, str]:
        cancelled = asyncio.ensure_future(swallowing())
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.wait({cancelled}, timeout=5)
        left_alone = asyncio.ensure_future(asyncio.wait_for(swallowing(), 0.05))
        with pytest.raises(TimeoutError):  # its own timeout is not a cancellation of the caller
            await left_alone
        return cancelled.cancelled(), "ok"

    assert asyncio.run(scenario()) == (True, "ok")


# --- a cancellation swallowed whole: the call returns as if nothing happened ---------------------


async def _hides_a_cancellation(calls: list[str], name: str) -> None:
    """A call that, cancelled while it waits, returns normally (no exception at all). Only the
    first call hides it, so that a loop that fails to end can still be stopped by a second
    cancellation (the test then fails instead of hanging)."""
    calls.append(name)
    if len(calls) > 1:
        await asyncio.sleep(10)
        return
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(10)


def _ends_when_cancelled(
    start: Callable[[], object], task: Callable[[], asyncio.Task[Any] | None], close: Callable[[], Awaitable[object]]
) -> bool:
    """Start a background loop, cancel its task once it waits in the hiding call, then close
    its owner: True when the task ended, cancelled, within 5 s."""

    async def scenario() -> bool:
        start()
        running = task()
        assert running is not None
        await asyncio.sleep(0.05)
        running.cancel()
        done, _ = await asyncio.wait({running}, timeout=5)
        await asyncio.wait_for(close(), 5)
        return done == {running} and running.cancelled()

    return asyncio.run(scenario())


def test_the_metrics_sampler_ends_when_a_source_swallows_its_cancellation_whole() -> None:
    """What a uvicorn worker hit at shutdown: the sampler's Redis read returned instead of
    raising, the sampler slept on, and ``Runtime.aclose`` waited for it forever."""
    from prometheus_client import CollectorRegistry

    from gateway.observability.metrics import Metrics
    from gateway.observability.sampler import Sampler, Sources

    calls: list[str] = []

    async def backlog() -> int:
        await _hides_a_cancellation(calls, "backlog")
        return 0

    async def budgets() -> dict[int, float]:
        return {}

    sources = Sources(
        health=dict,
        accounts=list,
        down=set,
        writer_up=lambda: True,
        pending=lambda: 0,
        backlog=backlog,
        snapshot=lambda: None,
        budgets=budgets,
    )
    sampler = Sampler(Metrics(CollectorRegistry()), sources, 0.01)
    assert _ends_when_cancelled(sampler.start, lambda: sampler._task, sampler.aclose)
    assert calls == ["backlog"]  # not sampled again after the cancellation


def test_a_background_flush_ends_when_its_flush_swallows_the_cancellation_whole() -> None:
    from accounts.infra.batching import BackgroundFlush

    calls: list[str] = []

    async def flush() -> None:
        await _hides_a_cancellation(calls, "flush")

    flusher = BackgroundFlush(flush, pending=lambda: True, what="test records")
    assert _ends_when_cancelled(flusher.kick, lambda: flusher._task, flusher.stop)
    assert calls == ["flush"]


def test_the_prober_ends_when_a_round_swallows_the_cancellation_whole() -> None:
    from accounts.health.machine import HealthMachine
    from accounts.health.probing import Prober
    from accounts.health.store import LocalHealthStore

    calls: list[str] = []
    store = LocalHealthStore(HealthMachine())

    async def targets() -> list[object]:
        await _hides_a_cancellation(calls, "targets")
        return []

    prober = Prober(store, client=None, targets=targets)  # type: ignore[arg-type]
    prober._suspects.add(1)  # so that the first round asks for its targets

    def start() -> None:
        prober.start()
        prober._wake.set()  # as consider() does for a suspect

    assert _ends_when_cancelled(start, lambda: prober._task, prober.aclose)
    assert calls == ["targets"]
