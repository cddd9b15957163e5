"""How many usage records wait for the usage writer (for /readyz and the backlog gauge).

- Redis: the writers' group on the stream: its ``lag`` (entries not yet delivered) plus its
  ``pending`` (delivered, not yet acknowledged); before any writer made the group, the
  stream's length.
- Embedded: the bytes of the journal segments still on disk divided by
  :data:`RECORD_BYTES` (a record line is ~500 bytes), an estimate: a segment is deleted only
  once read to its end, so its part already written counts until then.

Neither is on the request path: a sampler calls it every few seconds, /readyz once a call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.metering.journal import DEAD_NAME
from gateway.metering.stream import GROUP, STREAM

RECORD_BYTES = 512


async def stream_backlog(redis: Any, stream: str = STREAM, group: str = GROUP) -> int:
    """Records of ``stream`` that ``group`` has not acknowledged yet."""
    if not await redis.exists(stream):
        return 0
    for info in await redis.xinfo_groups(stream):
        name = info["name"]
        if name in (group, group.encode()):
            lag = info.get("lag")
            if lag is None:  # Redis cannot tell (entries deleted mid-stream): the upper bound
                lag = await redis.xlen(stream)
            return int(lag) + int(info["pending"])
    return int(await redis.xlen(stream))


def journal_backlog(directory: Path) -> int:
    """An estimate of the records in the journal segments under ``directory``."""
    total = 0
    if directory.is_dir():
        for path in directory.glob("*.jsonl"):
            if path.name == DEAD_NAME:
                continue
            try:
                total += path.stat().st_size
            except FileNotFoundError:  # drained meanwhile
                continue
    return total // RECORD_BYTES
