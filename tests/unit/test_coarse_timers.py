"""accounts/upstream/timers.py: deadlines in buckets behind one loop timer."""

from __future__ import annotations

import asyncio
from typing import Any

from accounts.upstream.timers import CoarseTimers

RESOLUTION = 0.02


def test_a_timer_fires_not_before_its_time_and_within_the_resolution() -> None:
    timers = CoarseTimers(RESOLUTION)

    async def main() -> list[tuple[str, float, float]]:
        loop = asyncio.get_running_loop()
        fired: list[tuple[str, float, float]] = []
        done = asyncio.Event()
        start = loop.time()

        def fire(name: str, when: float) -> None:
            fired.append((name, when, loop.time()))
            if len(fired) == 3:
                done.set()

        for name, delay in (("late", 0.13), ("early", 0.05), ("middle", 0.08)):
            timers.call_at(loop, start + delay, fire, name, start + delay)
        await asyncio.wait_for(done.wait(), 5)
        return fired

    fired = asyncio.run(main())
    assert [name for name, _, _ in fired] == ["early", "middle", "late"]
    for _, when, at in fired:
        assert when <= at < when + RESOLUTION + 0.5  # never early; late by the resolution (+ scheduling slack)
    assert len(timers) == 0


def test_cancelled_timers_never_fire_and_leave_nothing_behind() -> None:
    timers = CoarseTimers(RESOLUTION)
    fired: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        armed = [timers.call_at(loop, loop.time() + 0.01 * (n % 10), fired.append, n) for n in range(1000)]
        for timer in armed:
            if timer.args[0] % 2:
                timer.cancel()
                timer.cancel()  # idempotent
        assert len(timers) == 500
        await asyncio.sleep(0.1 + 2 * RESOLUTION)

    asyncio.run(main())
    assert sorted(fired) == list(range(0, 1000, 2))
    assert len(timers) == 0


def test_arming_and_cancelling_at_a_high_rate_keeps_the_heap_bounded() -> None:
    """Many timers armed and cancelled in the same buckets: each bucket is queued once, so
    the heap holds at most the longest delay over the resolution."""
    timers = CoarseTimers(RESOLUTION)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            for _ in range(500):
                timers.call_at(loop, loop.time() + 1.0, lambda: None).cancel()
            await asyncio.sleep(0.005)
        return len(timers._heap)

    queued = asyncio.run(main())
    assert queued <= 1.0 / RESOLUTION + 10


def test_a_failing_callback_is_reported_and_the_others_still_run() -> None:
    timers = CoarseTimers(RESOLUTION)
    ran: list[str] = []
    reported: list[dict[str, Any]] = []

    def boom() -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        when = loop.time() + 0.01
        timers.call_at(loop, when, boom)
        timers.call_at(loop, when, ran.append, "after")
        await asyncio.sleep(0.05 + 2 * RESOLUTION)

    asyncio.run(main())
    assert ran == ["after"]
    assert len(reported) == 1
    assert isinstance(reported[0]["exception"], RuntimeError)


def test_a_callback_may_arm_the_next_timer() -> None:
    timers = CoarseTimers(RESOLUTION)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        count = 0
        done = asyncio.Event()

        def again() -> None:
            nonlocal count
            count += 1
            if count < 3:
                timers.call_at(loop, loop.time() + 0.01, again)
            else:
                done.set()

        timers.call_at(loop, loop.time() + 0.01, again)
        await asyncio.wait_for(done.wait(), 5)
        return count

    assert asyncio.run(main()) == 3


def test_a_new_event_loop_starts_afresh() -> None:
    """The timers of a finished loop are forgotten; the new loop's fire."""
    runs = 2
    timers = CoarseTimers(RESOLUTION)
    fired: list[int] = []

    async def main(n: int) -> None:
        loop = asyncio.get_running_loop()
        timers.call_at(loop, loop.time() + 60, fired.append, -n)  # never due in this loop
        timers.call_at(loop, loop.time() + 0.01, fired.append, n)
        await asyncio.sleep(0.05 + 2 * RESOLUTION)

    for n in range(runs):
        asyncio.run(main(n))
    assert fired == list(range(runs))


def test_a_timer_armed_by_a_callback_does_not_delay_the_buckets_already_queued() -> None:
    """A callback that arms a far timer (as ``Deadline`` re-arms itself) while it fires must not
    move the loop timer past a nearer bucket already queued: that one still fires on time."""
    timers = CoarseTimers(RESOLUTION)

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        fired: list[str] = []
        done = asyncio.Event()
        start = loop.time()

        def rearm() -> None:
            fired.append("first")
            timers.call_at(loop, loop.time() + 60, fired.append, "far")

        def near() -> None:
            fired.append("near")
            done.set()

        timers.call_at(loop, start + 0.02, rearm)
        timers.call_at(loop, start + 0.2, near)
        await asyncio.wait_for(done.wait(), 5)
        assert len(timers) == 1  # the far one, still armed
        return fired

    assert asyncio.run(main()) == ["first", "near"]


def test_a_timer_cancelled_by_a_callback_of_its_own_bucket_does_not_fire() -> None:
    timers = CoarseTimers(RESOLUTION)
    fired: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + 0.03
        second: list[Any] = []

        def first() -> None:
            fired.append("first")
            second[0].cancel()

        timers.call_at(loop, when, first)
        second.append(timers.call_at(loop, when, fired.append, "second"))
        await asyncio.sleep(0.03 + 3 * RESOLUTION)

    asyncio.run(main())
    assert fired == ["first"]
    assert len(timers) == 0
