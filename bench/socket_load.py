"""Load for the WebSocket column: streamed responses on persistent connections, WebSocket or SSE.

``python -m bench.socket_load --mode ws|sse --port P --auth KEY --body JSON --connections N --seconds S``
runs N connections for S seconds, each sending the next request as soon as the previous
response ended (``response.completed``), and prints one ``BENCH {json}`` line shaped like
bench/wrk_bench.lua's (requests, errors, latency quantiles in microseconds).

Both modes use the same asyncio client in its own process, so the comparison is transport
against transport: ``ws`` sends ``{"type": "response.create", ...body}`` text messages on one
socket per connection (gateway/dataplane/socket.py); ``sse`` sends ``POST /v1/responses`` with
``stream: true`` on one keep-alive HTTP/1.1 connection and reads the chunked event stream to
its last chunk. A response that does not end with ``response.completed`` counts as an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

COMPLETED = b'"type":"response.completed"'


async def ws_connection(port: int, auth: str, body: dict[str, Any], until: float, out: dict[str, Any]) -> None:
    from websockets.asyncio.client import connect

    message = json.dumps({"type": "response.create", **body}, separators=(",", ":"))
    async with connect(
        f"ws://127.0.0.1:{port}/v1/responses",
        additional_headers={"authorization": f"Bearer {auth}"},
        max_size=None,
        compression=None,
    ) as ws:
        while time.perf_counter() < until:
            start = time.perf_counter()
            await ws.send(message)
            ok = False
            while True:
                frame = await ws.recv(decode=False)
                head = frame[:48]
                if COMPLETED in head:
                    ok = True
                    break
                if b'"response.failed"' in head or (b'"type":"error"' in head and b'"status"' in frame):
                    break
            out["latencies"].append(time.perf_counter() - start)
            out["requests"] += 1
            out["errors"] += not ok


async def sse_connection(port: int, auth: str, body: dict[str, Any], until: float, out: dict[str, Any]) -> None:
    payload = json.dumps({**body, "stream": True}, separators=(",", ":")).encode()
    request = (
        f"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {auth}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            completed = False
            # Chunked: size line, data, CRLF; a zero-size chunk ends the body.
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                data = await reader.readexactly(size + 2)
                completed = completed or COMPLETED in data
            out["latencies"].append(time.perf_counter() - start)
            out["requests"] += 1
            out["errors"] += status != 200 or not completed
    finally:
        writer.close()


async def run(mode: str, port: int, auth: str, body: dict[str, Any], connections: int, seconds: float) -> dict:
    out: dict[str, Any] = {"requests": 0, "errors": 0, "latencies": []}
    connection = ws_connection if mode == "ws" else sse_connection
    started = time.perf_counter()
    until = started + seconds
    results = await asyncio.gather(
        *(connection(port, auth, body, until, out) for _ in range(connections)), return_exceptions=True
    )
    elapsed = time.perf_counter() - started
    failed = [r for r in results if isinstance(r, BaseException)]
    latencies = sorted(out["latencies"]) or [0.0]

    def quantile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e6

    return {
        "requests": out["requests"],
        "duration_us": elapsed * 1e6,
        "status_errors": out["errors"],
        "connect_errors": len(failed),
        "read_errors": 0,
        "write_errors": 0,
        "timeouts": 0,
        "p50_us": quantile(0.5),
        "p90_us": quantile(0.9),
        "p99_us": quantile(0.99),
        "mean_us": statistics.fmean(latencies) * 1e6,
        "failures": [repr(r)[:200] for r in failed[:3]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("ws", "sse"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--auth", required=True)
    parser.add_argument("--body", required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(args.mode, args.port, args.auth, json.loads(args.body), args.connections, args.seconds))
    print("BENCH " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
