"""The one drain loop: usage from the journal or the Redis stream into the database.

Run by the usage writer child of every gateway process (:mod:`gateway.metering.writer`)
and by ``manage.py usage_drain``. A :class:`Source` (:class:`~gateway.metering.journal.JournalSource`
or :class:`~gateway.metering.stream.StreamSource`) says how to take one step; the loop
says when: steps back to back while there is work, ``idle`` seconds apart when there is
none, and with a growing backoff (0.5 s doubling up to ``max_backoff``) while the
database or Redis fails, records staying where they are meanwhile. One log line per
failure streak (not per retry) and one when it ends. When ``stop`` is set it makes the
source's last pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from accounts.infra.redis import raise_if_cancelled
from gateway.metering.database import UsageWriteFailed

logger = logging.getLogger(__name__)


class Source(Protocol):
    name: str

    async def step(self) -> int:
        """Write one batch; return how many records were handled (0: none waiting).

        Raises UsageWriteFailed on an outage; what was not written stays for a retry.
        """
        ...

    async def finish(self, wait: float) -> None:
        """The last pass at shutdown: write what is left, for up to ``wait`` seconds."""
        ...


async def drain(
    source: Source, stop: asyncio.Event, *, idle: float, max_backoff: float = 10.0, last: float = 5.0
) -> None:
    """Step ``source`` until ``stop`` is set, then make its last pass (at most ``last`` seconds)."""
    delay = 0.0
    failing = False
    while not stop.is_set():
        raise_if_cancelled()  # a cancellation a library swallowed whole still ends the loop
        try:
            handled = await source.step()
        except Exception as exc:
            raise_if_cancelled()
            delay = min(max(delay * 2, 0.5), max_backoff)
            if not failing:  # once per failure streak, not once per retry
                if isinstance(exc, UsageWriteFailed):
                    logger.warning("usage write failed (%s); records stay in the %s, retrying", exc, source.name)
                else:  # Redis unreachable, a disk error, a bug: with its traceback
                    logger.exception("the usage %s drainer failed; records stay there, retrying", source.name)
            failing = True
        else:
            if failing:
                logger.warning("usage from the %s reaches the database again", source.name)
            failing = False
            delay = 0.0 if handled else idle
        if delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
    try:
        await source.finish(last)
    except Exception:
        logger.exception("usage left in the %s for the next start", source.name)
