"""CPU cost of counting one request: ``python -m bench.metrics_micro`` (docs/performance.md).

Times :meth:`gateway.observability.metrics.Recorder.request` (and its flush) for two finished
exchanges, a plain success and a stream served after one failed attempt, and the JSON access
line (:func:`~gateway.observability.logs.json_line` into an
:class:`~gateway.observability.logs.AccessLog` on /dev/null). Run it twice: as is (one
process's registry, what ``serve`` with one worker uses) and with ``PROMETHEUS_MULTIPROC_DIR``
set to an empty directory (what ``serve --workers N`` uses: values in mmap'ed files).
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import timeit

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.conf.settings")
django.setup()

from decimal import Decimal  # noqa: E402

from accounts.upstream.account import AccountInfo  # noqa: E402
from gateway.config.snapshot import KeyInfo  # noqa: E402
from gateway.dataplane.exchange import Exchange  # noqa: E402
from gateway.observability.logs import ACCESS_FIELDS, AccessLog, json_line  # noqa: E402
from gateway.observability.metrics import Metrics, Recorder  # noqa: E402

KEY = KeyInfo(1, 7, "acme", "sk-gw-PREFIX0123", "d" * 64, None, None)
USAGE: dict[str, int | None] = {
    "input_tokens": 20,
    "cached_tokens": 0,
    "cache_write_tokens": 0,
    "output_tokens": 16,
    "reasoning_tokens": 0,
    "total_tokens": 36,
}


def exchange(failover: bool) -> Exchange:
    ex = Exchange("req_0123456789abcdef01234567", 0.0)
    ex.key, ex.model, ex.upstream_model, ex.planned = KEY, "gpt-test", "gpt-test", True
    if failover:
        ex.stream = True
        ex.attempt_started = 0.01
        ex.note_attempt(1, "upstream_error", 500, dict.fromkeys(USAGE))
    ex.account = AccountInfo(account_id=2)
    ex.attempt_started = 0.02
    ex.finish(200, "completed", USAGE, response_id="resp_1", ttfb_ms=3.0)
    return ex


async def measure() -> None:
    """Timed inside a running event loop, as in a serving process: a request adds to tallies;
    the flush into prometheus-client (once a second there) is timed on its own."""
    recorder = Recorder(Metrics())
    mode = "multiprocess (mmap files)" if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else "one process"
    number = 50_000
    for name, ex in (("success", exchange(False)), ("stream after a failover", exchange(True))):
        call = functools.partial(recorder.request, ex, "responses", Decimal("0.0001"), 0.01)
        seconds = min(timeit.repeat(call, number=number, repeat=5))
        print(f"Recorder.request, {name}, {mode}: {seconds / number * 1e6:.2f} µs")
        recorder.flush()
        for _ in range(3_000):  # a second's requests at ~3,000 req/s
            call()
        started = time.perf_counter()
        recorder.flush()
        print(f"  its flush after 3,000 requests: {(time.perf_counter() - started) * 1e6:.0f} µs")
    fields = dict.fromkeys(ACCESS_FIELDS, "x" * 12)
    fd = os.open(os.devnull, os.O_WRONLY)
    sink = AccessLog(fd, interval=3600)  # the batch is written when 64 KiB wait

    def line() -> None:
        sink.write(json_line("POST /v1/responses 200", fields))

    seconds = min(timeit.repeat(line, number=number, repeat=5))
    sink.flush()
    print(f"JSON access line (batched): {seconds / number * 1e6:.2f} µs")


def main() -> None:
    asyncio.run(measure())


if __name__ == "__main__":
    main()
