"""CPU-heavy work of large request bodies, off the event loop and one at a time.

Parsing, validating and re-serializing a 14 MiB body of 480,000 small items takes ~0.8 s of
CPU. On the event loop that stalls every other request for as long; eight such bodies at
once stalled small requests for 1.7 s (bench/big_bodies.py, docs/operations.md). Above
:data:`OFFLOAD_BYTES` the work runs in a worker thread instead, one body at a time, so the
loop keeps serving: the GIL is handed back to the loop every switch interval (1 ms, set by
the runtime), except inside a single C call such as ``orjson.loads`` (~0.2 s for the
largest body the size limit lets in). Smaller bodies stay on the loop, where a thread hop
would cost more than the work.

Contract: :meth:`Offload.run` returns what ``work(*args)`` returns or raises what it raises;
a caller cancelled while its work runs leaves the work to finish in its thread. The hot path
calls the work itself for a body under :attr:`Offload.threshold` (no coroutine, no await) and
``run`` only for larger ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

# Bodies from this size on are worked on in a thread (1 MiB: ~35,000 small items, ~60 ms).
OFFLOAD_BYTES = 1 << 20

P = ParamSpec("P")
R = TypeVar("R")


class Offload:
    """Runs the work of large bodies in a worker thread, one at a time (see the module doc)."""

    def __init__(self, threshold: int = OFFLOAD_BYTES) -> None:
        self.threshold = threshold
        self._one = asyncio.Semaphore(1)

    async def run(self, size: int, work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``work(*args, **kwargs)``: inline for a body of ``size`` bytes under the threshold."""
        if size < self.threshold:
            return work(*args, **kwargs)
        async with self._one:
            return await asyncio.to_thread(work, *args, **kwargs)
