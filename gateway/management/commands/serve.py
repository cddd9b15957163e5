"""``python manage.py serve``: run the gateway (data plane + console) on one port."""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser


class Command(BaseCommand):
    help = "Serve the gateway over ASGI (uvicorn by default, or Daphne)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=settings.PORT)
        parser.add_argument("--server", choices=["uvicorn", "daphne"], default=settings.GATEWAY_SERVER)
        parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")

    def handle(self, *args: Any, **options: Any) -> None:
        host, port = options["host"], options["port"]
        self.stdout.write(f"gateway serving on http://{host}:{port} ({options['server']})")
        self.stdout.flush()
        if options["server"] == "daphne":
            from daphne.cli import CommandLineInterface

            CommandLineInterface().run(
                ["-b", host, "-p", str(port), "--verbosity", "0", "gateway.conf.asgi:application"]
            )
            return
        import uvicorn

        if options["workers"] < 1:
            raise CommandError("--workers must be at least 1")
        uvicorn.run(
            "gateway.conf.asgi:application",
            host=host,
            port=port,
            workers=options["workers"],
            loop="uvloop",
            http="httptools",
            lifespan="on",
            log_level="warning",
            access_log=False,
            proxy_headers=False,
            timeout_graceful_shutdown=10,
        )
