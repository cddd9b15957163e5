"""How much one tenant's very large bodies stall everyone else (issue 10, item 8).

``python -m bench.big_bodies --url http://127.0.0.1:8000 --key sk-gw-... --model gpt-4.1 --small-model gpt-4.1-mini``

Against a running gateway: ``--big`` clients at once each send one body of ``--items``
small input items (480,000 items: 13.7 MiB, under the 16 MiB body limit), while one
client sends small requests back to back and measures each one's latency. Prints one JSON
line: the small requests' latency (median, p99, max) while the big ones run, their
baseline alone, and the big requests' statuses and times. Route ``--small-model`` to
another upstream process than ``--model``: the fake upstream parses each body on its own
event loop, so sharing it would measure the upstream's stalls, not the gateway's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

import httpx
import orjson


def big_body(model: str, items: int) -> bytes:
    return orjson.dumps({"model": model, "input": [{"role": "user", "content": "hi"}] * items})


def small_latencies(client: httpx.Client, body: dict[str, Any], stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        response = client.post("/v1/responses", json=body)
        out.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"small request answered {response.status_code}: {response.text[:200]}")


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.big_bodies", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--model", default="gpt-4.1")
    parser.add_argument("--small-model", default="", help="default: --model")
    parser.add_argument("--big", type=int, default=8)
    parser.add_argument("--items", type=int, default=480_000)
    args = parser.parse_args()
    headers = {"authorization": f"Bearer {args.key}"}
    small = {"model": args.small_model or args.model, "input": "hi"}
    payload = big_body(args.model, args.items)
    with httpx.Client(base_url=args.url, headers=headers, timeout=120) as client:
        baseline: list[float] = []
        stop = threading.Event()
        timer = threading.Timer(2.0, stop.set)
        timer.start()
        small_latencies(client, small, stop, baseline)

        loaded: list[float] = []
        stop = threading.Event()
        prober = threading.Thread(target=small_latencies, args=(client, small, stop, loaded))
        results: list[tuple[int, float]] = []

        def send_big() -> None:
            with httpx.Client(base_url=args.url, headers=headers, timeout=120) as own:
                started = time.perf_counter()
                response = own.post("/v1/responses", content=payload, headers={"content-type": "application/json"})
                results.append((response.status_code, round(time.perf_counter() - started, 2)))

        prober.start()
        time.sleep(0.3)
        senders = [threading.Thread(target=send_big) for _ in range(args.big)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        stop.set()
        prober.join()
    report = {
        "body_mib": round(len(payload) / 2**20, 1),
        "big": args.big,
        "small_alone": summary(baseline),
        "small_during_big": summary(loaded),
        "big_results": sorted(results),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
