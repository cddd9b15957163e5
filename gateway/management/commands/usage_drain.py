"""``python manage.py usage_drain [--once]``: write the Redis usage stream to the database.

A dedicated worker for ``gateway.usage_stream``: it joins the ``gw-writers`` consumer
group next to the gateway processes' own drainers. ``--once`` writes what is there
now (taking over entries that dead consumers left pending) and exits; it fails when
the database refuses, leaving the entries in the stream. ``--requeue-dead`` moves the
events set aside as refused (``gw:usage:dead``) back into the stream first.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.usage_stream import GROUP, STREAM, UsageDrainer, UsageWriteFailed, django_writer, run_drainer


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
        if not settings.REDIS_URL:
            raise CommandError("REDIS_URL is not set: without Redis, each gateway process writes its own usage.")
        if options["batch"] < 1:
            raise CommandError("--batch must be at least 1")
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
