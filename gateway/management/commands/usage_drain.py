"""``python manage.py usage_drain [--once]``: write pending usage records to the database.

It drains what this deployment meters into (:func:`gateway.metering.writer.opened_source`):
with Redis, the usage stream, as a dedicated worker of the ``gw-writers`` consumer group
next to the gateway processes' own writers; embedded, the usage journal, like a gateway's
usage writer process (only one process drains a journal at a time, so it stands by while
a gateway's writer is active). Without ``--once`` it runs the drain loop
(:mod:`gateway.metering.drain`) until SIGINT or SIGTERM.

``--once`` writes what is there now and exits; it fails when the database refuses,
leaving the records where they are. ``--requeue-dead`` (Redis) moves the events set aside
as refused (``gw:usage:dead``) back into the stream first.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.metering.database import UsageWriteFailed
from gateway.metering.drain import Source, drain
from gateway.metering.journal import JournalSource
from gateway.metering.stream import STREAM, StreamSource
from gateway.metering.writer import POLL_SECONDS, opened_source


class Command(BaseCommand):
    help = "Write usage records from the journal (or the Redis stream) to the database."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="drain what is there now, then exit")
        parser.add_argument(
            "--requeue-dead", action="store_true", help="first put the events set aside as refused back in the stream"
        )
        parser.add_argument("--batch", type=int, default=500, help="records per database write")
        parser.add_argument("--consumer", default=None, help="Redis consumer name (default: host-pid-random)")
        parser.add_argument("--stream", default=STREAM, help="Redis stream name")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["batch"] < 1:
            raise CommandError("--batch must be at least 1")
        if options["requeue_dead"] and not settings.REDIS_URL:
            raise CommandError("--requeue-dead is for the Redis stream; without Redis, see usage-journal/dead.jsonl")
        asyncio.run(self._run(options))

    async def _run(self, options: dict[str, Any]) -> None:
        async with opened_source(
            consumer=options["consumer"], batch=options["batch"], stream=options["stream"]
        ) as source:
            if options["requeue_dead"]:
                assert isinstance(source, StreamSource)
                moved = await source.drainer.requeue_dead()
                self.stdout.write(f"{moved} refused usage entries put back in the stream")
            if options["once"]:
                self.stdout.write(f"{await self._once(source)} usage records written")
                return
            self.stdout.write(f"draining the usage {source.name} into the database (Ctrl-C to stop)")
            self.stdout.flush()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            await drain(source, stop, idle=POLL_SECONDS)

    async def _once(self, source: Source) -> int:
        try:
            if isinstance(source, JournalSource):
                if not source.drainer.acquire():
                    raise CommandError("a gateway's usage writer is draining the journal now; nothing to do")
                return await asyncio.to_thread(source.drainer.drain)
            assert isinstance(source, StreamSource)
            return await source.drainer.drain()
        except UsageWriteFailed as exc:
            raise CommandError(
                f"the database refused the usage records ({exc}); they stay in the {source.name}"
            ) from exc
