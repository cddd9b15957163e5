"""The process's synchronous Redis clients: one per URL, made on first use.

For the code that talks to Redis outside the event loop (services announcing a change,
operator commands reading health, a last flush at shutdown). Each client has its own
connection pool, which redis-py resets in a forked child, so one per process and URL is
enough: this is the one place that makes them. The data plane's asyncio clients are made by
the runtime (gateway/limits/redis_backend.py ``redis_client``).
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis as redis_sync


@functools.cache
def sync_client(url: str) -> redis_sync.Redis:
    """The synchronous client of ``url`` (the same object on every call with that URL)."""
    import redis as redis_sync

    return redis_sync.Redis.from_url(url)


def raise_if_cancelled() -> None:
    """Re-raise a cancellation of the current task that a library turned into another exception.

    Call it first in an ``except Exception`` of a background loop that must end when its task is
    cancelled: redis-py can turn a cancellation that lands inside a call into a connection error,
    and a loop that logged it and went on would never end (its owner's ``await task`` at shutdown
    would hang, and the process with it). Call it once per round of the loop too: a cancellation
    can also be swallowed whole, the call returning as if nothing happened (seen in a uvicorn
    worker whose metrics sampler never ended, so neither did its shutdown). The task's
    ``cancelling()`` count still says it was asked to stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
