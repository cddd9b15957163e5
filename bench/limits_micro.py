"""Micro-benchmark of the limit engine: admits (+ settles) per second, one process.

    .venv/bin/python -m bench.limits_micro [--redis redis://127.0.0.1:6379/0] [--tasks 16] [--seconds 3]

Each of ``--tasks`` tasks loops admit -> settle with a key and a tenant scope that
have every limit set (rpm, tpm, concurrency, tokens and money budgets) but never
refuse, so each admit does the full work. Runs on uvloop, like the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

from gateway.limits.engine import LocalLimiter, Scope

BIG = 10**15


def scopes(key_id: int) -> list[Scope]:
    window = (int(time.time()) // 86_400 * 86_400, int(time.time()) // 86_400 * 86_400 + 86_400)
    common: dict[str, Any] = {
        "rpm": BIG,
        "tpm": BIG,
        "concurrency": 10_000,
        "budget_tokens": BIG,
        "budget_micros": BIG,
        "window_start": window[0],
        "window_end": window[1],
        "soft_percent": 80,
    }
    return [Scope("key", key_id, **common), Scope("tenant", 1, **common)]


async def run(limiter: Any, tasks: int, seconds: float) -> float:
    deadline = time.perf_counter() + seconds
    done = 0

    async def worker(n: int) -> None:
        nonlocal done
        mine = scopes(n % 4)
        while time.perf_counter() < deadline:
            decision = await limiter.admit(mine, tokens=500, micros=1000)
            assert decision.ticket is not None
            limiter.settle(decision.ticket, tokens=400, micros=900)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(tasks)))
    await limiter.flush()
    return done / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    rate = await run(LocalLimiter(), args.tasks, args.seconds)
    print(f"LocalLimiter: {rate:,.0f} admits/s ({args.tasks} tasks)")
    if not args.redis:
        return
    from gateway.limits.redis_backend import RedisLimiter, redis_client

    client = redis_client(args.redis)
    prefix = f"gwbench:{uuid.uuid4().hex}:"
    limiter = RedisLimiter(client, prefix=prefix, config_key=prefix + "gen")
    try:
        rate = await run(limiter, args.tasks, args.seconds)
        print(f"RedisLimiter: {rate:,.0f} admits/s ({args.tasks} tasks, settles carried by admits or batched)")
    finally:
        await limiter.aclose()
        keys = [key async for key in client.scan_iter(prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--redis", default="")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    import uvloop

    uvloop.run(main(parser.parse_args()))
