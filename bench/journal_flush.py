"""What appending each usage record to the journal at once costs, against batching it.

    .venv/bin/python -m bench.journal_flush [--records 100000] [--rounds 3]

In one process on uvloop, like the gateway: ``--records`` records (a usage event of the
gateway's shape) are made ``per_iteration`` at a time with one event-loop iteration in
between (1: one request per iteration, a lightly loaded gateway; 8: a loaded one). It
compares the CPU time per record (``time.process_time``) of

- ``journal``: :class:`gateway.metering.journal.JournalWriter`, one ``os.write`` per record
  (the record is on disk when the request ends);
- ``batched``: the policy it replaced, the records buffered and appended with one
  ``os.write`` every 50 ms (a SIGKILL loses the last 50 ms of records);
- ``buffer only``: encoding and buffering, never written (the floor).

The gateway spends ~300 µs of CPU per request (docs/performance.md), so the difference
between the first two is the price of closing the window. Files go to a temporary
directory on the same file system as the gateway's ``var/``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import uvloop

from bench.run import ROOT
from gateway.metering.codec import encode_event
from gateway.metering.journal import JournalWriter

EVENT: dict[str, Any] = {
    "request_id": "req_" + "a" * 24,
    "tenant_id": 1,
    "api_key_id": 1,
    "account_id": 1,
    "model": "gpt-4.1",
    "status_code": 200,
    "outcome": "completed",
    "stream": False,
    "response_id": "resp_" + "b" * 40,
    "latency_ms": 1.234,
    "ttfb_ms": 0.5,
    "created_at": datetime.now(UTC),
    "input_tokens": 12,
    "output_tokens": 20,
    "total_tokens": 32,
    "cost": "0.000123",
    "price_version_id": 1,
    "attempts": [],
}


class Meter(Protocol):
    def record(self, event: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class Batched:
    """Buffered records appended with one ``os.write`` every ``interval`` seconds."""

    def __init__(self, path: Path, interval: float | None) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._interval = interval  # None: never written
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None

    def record(self, event: dict[str, Any]) -> None:
        self._buffer += encode_event(event)
        self._buffer += b"\n"
        if self._interval is not None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._flush)

    def _flush(self) -> None:
        self._timer = None
        os.write(self._fd, self._buffer)
        self._buffer.clear()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        os.close(self._fd)


async def cpu_per_record(meter: Meter, records: int, per_iteration: int) -> float:
    started = time.process_time()
    for _ in range(records // per_iteration):
        for _ in range(per_iteration):
            meter.record(EVENT)
        await asyncio.sleep(0)
    await asyncio.sleep(0.06)  # the last batch
    spent = time.process_time() - started
    meter.close()
    return spent / records * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.journal_flush", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    (ROOT / "var").mkdir(exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="journal-bench-", dir=ROOT / "var"))
    try:
        for per_iteration in (1, 8):
            for _ in range(args.rounds):
                work = directory / f"{time.time_ns()}"
                meters: dict[str, Meter] = {
                    "journal": JournalWriter(work / "journal"),
                    "batched": Batched(directory / f"{time.time_ns()}-batched", 0.05),
                    "buffer only": Batched(directory / f"{time.time_ns()}-none", None),
                }
                row = [
                    f"{name} {uvloop.run(cpu_per_record(meter, args.records, per_iteration)):.2f}"
                    for name, meter in meters.items()
                ]
                print(f"{per_iteration} per loop iteration, µs of CPU per record: " + " | ".join(row))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
