"""CPU cost of a deadline armed and cancelled: ``python -m bench.timers_micro``.

Under uvloop (what ``manage.py serve`` runs), times ``loop.call_later`` + ``cancel`` against
:meth:`accounts.upstream.timers.CoarseTimers.call_at` + ``cancel``, the way the data plane
arms the deadlines of an upstream call it nearly never reaches (600 s away).
"""

from __future__ import annotations

import asyncio
import time

import uvloop

from accounts.upstream.timers import CoarseTimers

ROUNDS = 200_000
DELAY = 600.0


def _noop() -> None:
    return None


async def main() -> None:
    loop = asyncio.get_running_loop()
    timers = CoarseTimers()
    for _ in range(2):
        started = time.perf_counter()
        for _ in range(ROUNDS):
            loop.call_later(DELAY, _noop).cancel()
        uv = (time.perf_counter() - started) / ROUNDS * 1e6
        started = time.perf_counter()
        for _ in range(ROUNDS):
            timers.call_at(loop, loop.time() + DELAY, _noop).cancel()
        coarse = (time.perf_counter() - started) / ROUNDS * 1e6
        print(f"loop.call_later + cancel {uv:5.2f} µs; CoarseTimers.call_at + cancel {coarse:5.2f} µs")


if __name__ == "__main__":
    uvloop.run(main())
