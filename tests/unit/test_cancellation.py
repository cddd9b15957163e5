"""Background loops end when cancelled, even when a library turns the cancellation into an ordinary
exception (accounts/infra/redis.py ``raise_if_cancelled``): before, such a loop logged it, went on,
and its owner's ``await task`` at shutdown hung the process (a uvicorn worker never exited)."""

from __future__ import annotations

import asyncio
import contextlib

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
