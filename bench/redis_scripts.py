"""What redis-py's ``register_script`` costs against a bare ``EVALSHA``, per call, on one connection.

    .venv/bin/python -m bench.redis_scripts [--redis redis://127.0.0.1:6379/15] [--calls 20000] [--rounds 5]

Runs the limiter's admit script (gateway/limits/admit.lua, with a key and a tenant scope
that have every limit set) sequentially through:

- ``bare``: ``execute_command("EVALSHA", sha, ...)``, falling back to ``EVAL`` on NOSCRIPT
  (the hand-written class the backend had before);
- ``register_script``: redis-py's ``AsyncScript`` (``EVALSHA``; on NOSCRIPT,
  ``SCRIPT LOAD`` then ``EVALSHA``),

interleaved round by round, and reports the client's CPU per call (``time.process_time``,
the gateway's bottleneck) and the wall time per call, medians over the rounds. Then it
flushes the script cache and counts the commands each sends for its next call
(``INFO commandstats``): the only path where they differ in round trips. Last, the
Redis side: the server's CPU per call (``INFO commandstats`` ``usec_per_call``) of the
admit script with one and with five admissions, and of the settle script with one
ticket (a key and a tenant scope: two operations).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import uvloop
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from bench.limits_micro import scopes
from gateway.limits.redis_backend import ADMIT_LUA, _spec


class BareScript:
    """EVALSHA through ``execute_command``, EVAL on NOSCRIPT."""

    def __init__(self, source: str) -> None:
        import hashlib

        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, redis: Redis, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        try:
            return await redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await redis.execute_command("EVAL", self.source, len(keys), *keys, *args)


def admit_args(prefix: str) -> tuple[bytes, str, bytes]:
    """The admit script's arguments for one admission of a key and a tenant scope (nothing riding along)."""
    now = time.time()
    head = [prefix, int(now // 60), int(now * 1000), 500, 1000, "-", 600000, 120, 86400]
    return b"", "", orjson.dumps([[head, [_spec(scope, (0, 0)) for scope in scopes(1)], []]])


async def timed(call: Callable[[], Awaitable[Any]], calls: int) -> tuple[float, float]:
    """(client CPU us per call, wall us per call)."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        await call()
    return (time.process_time() - cpu) * 1e6 / calls, (time.perf_counter() - wall) * 1e6 / calls


_SCRIPT_COMMANDS = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_script|load")


async def commands_after_flush(redis: Redis, call: Callable[[], Awaitable[Any]]) -> dict[str, int]:
    """The script commands (EVALSHA, EVAL, SCRIPT LOAD) one call sends when Redis lost its scripts."""

    async def counts() -> dict[str, int]:
        stats = await redis.info("commandstats")
        return {name: int(stats.get(name, {}).get("calls", 0)) for name in _SCRIPT_COMMANDS}

    await redis.script_flush()
    before = await counts()
    await call()
    after = await counts()
    return {name.removeprefix("cmdstat_"): after[name] - before[name] for name in _SCRIPT_COMMANDS}


async def server_usec(redis: Redis, call: Callable[[], Awaitable[Any]], calls: int = 3000) -> float:
    """Redis' own CPU per script call (``usec_per_call`` of EVALSHA)."""
    await call()
    await redis.config_resetstat()
    for _ in range(calls):
        await call()
    stats = (await redis.info("commandstats"))["cmdstat_evalsha"]
    return float(stats["usec"]) / float(stats["calls"])


async def redis_side(redis: Redis, prefix: str, keys: tuple[str, ...], argv: tuple[bytes, str, bytes]) -> None:
    from gateway.limits.redis_backend import SETTLE_LUA, RedisLimiter

    admit = redis.register_script(ADMIT_LUA)
    one = argv[2][1:-1]
    five = b"[" + b",".join([one] * 5) + b"]"
    limiter = RedisLimiter(redis, prefix=prefix, config_key=keys[0], linger=3600)
    decision = await limiter.admit(scopes(1), tokens=500, micros=1000)
    assert decision.ticket is not None
    limiter.settle(decision.ticket, tokens=400, micros=900)
    settle_arg = limiter._take(100)[2]
    settle = redis.register_script(SETTLE_LUA)
    for name, call in (
        ("admit, 1 admission", lambda: admit(keys, argv)),
        ("admit, 5 admissions", lambda: admit(keys, (b"", "", five))),
        ("settle, 1 ticket", lambda: settle((), (settle_arg, ""))),
    ):
        print(f"Redis CPU {name:22} {await server_usec(redis, call):6.1f} us/call")


async def main(args: argparse.Namespace) -> None:
    redis = Redis.from_url(args.redis)
    prefix = f"bench:scripts:{time.time_ns()}:"
    keys = (prefix + "gen",)
    argv = admit_args(prefix)
    bare = BareScript(ADMIT_LUA)
    registered = redis.register_script(ADMIT_LUA)
    variants: dict[str, Callable[[], Awaitable[Any]]] = {
        "bare": lambda: bare(redis, keys, argv),
        "register_script": lambda: registered(keys=keys, args=argv),
    }
    for call in variants.values():
        await timed(call, 1000)  # warm-up (loads the script)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, call in variants.items():
            results[name].append(await timed(call, args.calls))
    for name, runs in results.items():
        cpu = statistics.median(r[0] for r in runs)
        wall = statistics.median(r[1] for r in runs)
        print(f"{name:16} client CPU {cpu:6.1f} us/call   wall {wall:6.1f} us/call  ({args.rounds} x {args.calls})")
    for name, call in variants.items():
        print(f"{name:16} commands for the first call after SCRIPT FLUSH: {await commands_after_flush(redis, call)}")
    await redis_side(redis, prefix, keys, argv)
    keys_left = [k async for k in redis.scan_iter(prefix + "*")]
    if keys_left:
        await redis.delete(*keys_left)
    await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    uvloop.run(main(parser.parse_args()))
