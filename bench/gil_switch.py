"""How long a busy event loop stalls while a worker thread computes, by GIL switch interval.

    .venv/bin/python -m bench.gil_switch [--rounds 5]

The gateway's event loop hands CPU-bound work to worker threads (a configuration snapshot
of 10,000 keys is ~100k objects built in a thread). While one runs, each time the loop
thread lets go of the GIL (its I/O poll) the worker takes it and keeps it until the loop
thread has waited a switch interval for it. This runs a busy loop on uvloop (a small piece
of work per iteration, like a request) while a thread builds a snapshot-like structure,
with the collector off (its pauses are another matter), and reports per interval the
loop's stalls over 0.5 ms during the build: how many, their median and the longest.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time

import uvloop


def build() -> None:
    snapshot = {}
    for i in range(10_000):
        snapshot[f"k{i}"] = {
            "id": i,
            "scopes": [(j, str(j), {"a": j}) for j in range(3)],
            "models": {f"m{j}" for j in range(4)},
        }


async def stalls(interval: float) -> list[float]:
    """The loop's stalls (ms) over 0.5 ms while a worker thread runs :func:`build`."""
    sys.setswitchinterval(interval)
    done = asyncio.Event()
    gaps: list[float] = []

    async def busy() -> None:
        last = time.perf_counter()
        while not done.is_set():
            sum(i * i for i in range(100))
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(busy())
    await asyncio.sleep(0.1)
    gaps.clear()
    await asyncio.get_running_loop().run_in_executor(None, build)
    done.set()
    await task
    return [gap * 1000 for gap in gaps if gap > 0.0005]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gil_switch", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    gc.disable()
    found: dict[float, list[float]] = {0.005: [], 0.001: []}
    for _ in range(args.rounds):
        for interval, all_stalls in found.items():
            all_stalls += uvloop.run(stalls(interval))
    for interval, all_stalls in found.items():
        print(
            f"switch interval {interval * 1000:.0f} ms: {len(all_stalls) / args.rounds:.1f} stalls per build,"
            f" median {statistics.median(all_stalls):.2f} ms, longest {max(all_stalls):.2f} ms"
        )


if __name__ == "__main__":
    main()
