"""``python manage.py usage_drain [--once]``: write pending usage records to the database.

With Redis, a dedicated worker for ``gateway.metering.stream``: it joins the ``gw-writers``
consumer group next to the gateway processes' own writers. ``--once`` writes what is
there now (taking over entries that dead consumers left pending) and exits; it fails
when the database refuses, leaving the entries in the stream. ``--requeue-dead`` moves
the events set aside as refused (``gw:usage:dead``) back into the stream first.

Embedded (no Redis), it drains the usage journal (``gateway.metering.journal``) like a
gateway's usage writer process; only one process drains a journal at a time, so it
stands by while a gateway's writer is active (``--once`` then fails, saying so).
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.metering.stream import GROUP, STREAM, UsageDrainer, UsageWriteFailed, django_writer, run_drainer


class Command(BaseCommand):
    help = "Write usage records from the Redis stream to the database."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="drain what is there now, then exit")
        parser.add_argument(
            "--requeue-dead", action="store_true", help="first put the events set aside as refused back in the stream"
        )
        parser.add_argument("--batch", type=int, default=500, help="entries per database write")
        parser.add_argument("--consumer", default=None, help="consumer name (default: host-pid-random)")
        parser.add_argument("--stream", default=STREAM)
        parser.add_argument("--group", default=GROUP)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["batch"] < 1:
            raise CommandError("--batch must be at least 1")
        if not settings.REDIS_URL:
            self._journal(options)
            return
        drainer_options = {
            "stream": options["stream"],
            "group": options["group"],
            "consumer": options["consumer"],
            "batch": options["batch"],
        }
        if options["requeue_dead"]:
            moved = asyncio.run(self._requeue(drainer_options))
            self.stdout.write(f"{moved} refused usage entries put back in the stream")
        if options["once"]:
            count = asyncio.run(self._once(drainer_options))
            self.stdout.write(f"{count} usage entries written")
            return
        self.stdout.write(f"draining {options['stream']} into the database (Ctrl-C to stop)")
        self.stdout.flush()
        asyncio.run(self._forever(drainer_options))

    async def _once(self, drainer_options: dict[str, Any]) -> int:
        import redis.asyncio as aioredis

        redis = aioredis.Redis.from_url(settings.REDIS_URL)
        try:
            return await UsageDrainer(redis, django_writer, **drainer_options).drain()
        except UsageWriteFailed as exc:
            raise CommandError(f"the database refused the usage records ({exc}); they stay in the stream") from exc
        finally:
            await redis.aclose()

    async def _requeue(self, drainer_options: dict[str, Any]) -> int:
        import redis.asyncio as aioredis

        redis = aioredis.Redis.from_url(settings.REDIS_URL)
        try:
            return await UsageDrainer(redis, django_writer, **drainer_options).requeue_dead()
        finally:
            await redis.aclose()

    async def _forever(self, drainer_options: dict[str, Any]) -> None:
        import redis.asyncio as aioredis

        redis = aioredis.Redis.from_url(settings.REDIS_URL)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await run_drainer(redis, django_writer, stop=stop, **drainer_options)
        finally:
            await redis.aclose()

    def _journal(self, options: dict[str, Any]) -> None:
        from gateway.metering.journal import JournalDrainer, drain_until
        from gateway.metering.writer import POLL_SECONDS, journal_dir, spool_dir

        if options["requeue_dead"]:
            raise CommandError("--requeue-dead is for the Redis stream; without Redis, see usage-journal/dead.jsonl")
        drainer = JournalDrainer(journal_dir(), batch=options["batch"], extra_dirs=[spool_dir()])
        if options["once"]:
            if not drainer.acquire():
                raise CommandError("a gateway's usage writer is draining the journal now; nothing to do")
            try:
                count = drainer.drain()
            except UsageWriteFailed as exc:
                raise CommandError(f"the database refused the usage records ({exc}); they stay in the journal") from exc
            finally:
                drainer.release()
            self.stdout.write(f"{count} usage records written")
            return
        self.stdout.write(f"draining {drainer.directory} into the database (Ctrl-C to stop)")
        self.stdout.flush()
        stopping: list[int] = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda number, frame: stopping.append(number))

        def stopped(delay: float) -> bool:
            if not stopping:
                time.sleep(delay)
            return bool(stopping)

        drain_until(drainer, stopped, poll=POLL_SECONDS)
        drainer.release()
