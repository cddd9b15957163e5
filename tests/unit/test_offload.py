"""Unit tests of gateway/dataplane/offload.py: large bodies' work off the event loop, one at a time."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.dataplane.offload import OFFLOAD_BYTES, Offload


def test_small_bodies_are_worked_on_inline() -> None:
    async def main() -> int | None:
        return await Offload().run(OFFLOAD_BYTES - 1, threading.get_ident)

    assert asyncio.run(main()) == threading.get_ident()


def test_large_bodies_are_worked_on_in_another_thread() -> None:
    async def main() -> int | None:
        return await Offload().run(OFFLOAD_BYTES, threading.get_ident)

    assert asyncio.run(main()) != threading.get_ident()


def test_large_bodies_are_worked_on_one_at_a_time() -> None:
    """Two large bodies never compete for the GIL with each other and the loop at once."""
    running = 0
    most = 0
    lock = threading.Lock()
    release = threading.Event()

    def work(index: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(5)
        with lock:
            running -= 1
        return index

    async def main() -> list[int]:
        offload = Offload(threshold=10)
        tasks = [asyncio.ensure_future(offload.run(10, work, index)) for index in range(4)]
        await asyncio.sleep(0.05)  # every task has started waiting: one works, three queue
        release.set()
        return list(await asyncio.gather(*tasks))

    assert asyncio.run(main()) == [0, 1, 2, 3]
    assert most == 1


def test_errors_of_the_work_reach_the_caller() -> None:
    def fail() -> None:
        raise ValueError("bad body")

    async def main() -> None:
        await Offload(threshold=0).run(1, fail)

    with pytest.raises(ValueError, match="bad body"):
        asyncio.run(main())
