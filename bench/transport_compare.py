"""Bare relay benchmark: ``UpstreamClient.post()`` (or a streamed read) per upstream transport.

Start a fake upstream, then from the project root:

    python -m gateway.devtools.fake_upstream.server --port 9201 &
    python -m bench.transport_compare --url http://127.0.0.1:9201/v1/responses

For each transport, ``--concurrency`` tasks POST back to back for ``--seconds`` (after a short
warm-up) in one process on uvloop, and the rate is printed. ``--stream`` asks for SSE and reads
the stream chunk by chunk, as the gateway's relay does. The number measures the client side only:
the fake upstream shares the machine, so compare transports with each other, not with wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
import orjson

from accounts.upstream.client import TRANSPORTS, UpstreamClient

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency where it installs
    uvloop = None  # type: ignore[assignment]


async def _run(transport: str, url: str, concurrency: int, seconds: float, stream: bool) -> tuple[float, int]:
    """Requests per second of ``transport`` and the number of failed requests."""
    client = UpstreamClient(transport=transport, connect_timeout=5.0, read_timeout=30.0)
    headers = httpx.Headers(
        {"content-type": "application/json", "accept": "text/event-stream" if stream else "application/json"}
    )
    body = orjson.dumps({"model": "gpt-4o-mini", "input": "Say hello to the benchmark.", "stream": stream})
    done = [0, 0]  # completed, failed
    counting = False

    async def worker() -> None:
        while True:
            try:
                if stream:
                    upstream = await client.open(url, headers, body)
                    try:
                        async for _chunk in upstream.chunks():
                            pass
                    finally:
                        await upstream.aclose()
                    ok = upstream.status == 200
                else:
                    ok = (await client.post(url, headers, body)).status == 200
            except Exception:
                ok = False
            if counting:
                done[0 if ok else 1] += 1

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(min(1.0, seconds / 5))  # warm-up: connections opened, caches filled
    counting = True
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    counting = False
    elapsed = time.perf_counter() - started
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()
    return done[0] / elapsed, done[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:9201/v1/responses")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--stream", action="store_true", help="request SSE and read it chunk by chunk")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help="comma-separated, in run order")
    args = parser.parse_args()
    run = uvloop.run if uvloop is not None else asyncio.run
    mode = "stream" if args.stream else "json"
    for transport in args.transports.split(","):
        rate, failed = run(_run(transport, args.url, args.concurrency, args.seconds, args.stream))
        print(f"{transport:8} {mode:6} c={args.concurrency:<3} {rate:8.0f} req/s  failed={failed}", flush=True)


if __name__ == "__main__":
    main()
