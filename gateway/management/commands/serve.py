"""``python manage.py serve``: run the gateway (data plane + admin) on one port.

uvicorn (the default) runs with the server limits of the settings (docs/operations.md,
"Server limits"): connections, request head size and count, head and body timeouts
(gateway/conf/server.py), idle keep-alive, and the reverse proxies whose forwarded
client address and scheme are believed.

``--celery`` also runs a Celery worker with its beat scheduler as a supervised child
(:mod:`gateway.management.celery_child`): what ``make run`` does, so that the embedded
default needs one command. In production run one ``celery -A gateway.conf.celery worker -B``
per deployment instead (docs/operations.md).

``--workers N`` (N > 1) gives the workers one directory for their metrics
(``DATA_DIR/metrics``, or ``PROMETHEUS_MULTIPROC_DIR``), so ``GET /metrics`` on any of them
answers for all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.conf.checks import SERVERS
from gateway.conf.files import private_directory
from gateway.management.celery_child import CeleryWorkerChild


def prepare_multiprocess_metrics(data_dir: Path) -> Path:
    """Several uvicorn workers: each keeps its metric values in files of one shared directory
    (prometheus-client's multiprocess mode), emptied now so that a previous run's counters do
    not add up; the workers inherit ``PROMETHEUS_MULTIPROC_DIR``. A directory set by the
    operator is used as it is (the operator empties it between runs)."""
    configured = settings.PROMETHEUS_MULTIPROC_DIR
    if configured:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = configured
        return Path(configured)
    directory = private_directory(data_dir / "metrics")
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory


class Command(BaseCommand):
    help = "Serve the gateway over ASGI (uvicorn by default, or Daphne)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=settings.HOST)
        parser.add_argument("--port", type=int, default=settings.PORT)
        parser.add_argument("--server", choices=SERVERS, default=settings.GATEWAY_SERVER)
        parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
        parser.add_argument(
            "--celery", action="store_true", help="also run a Celery worker with beat as a child (one-machine setups)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["workers"] < 1:
            raise CommandError("--workers must be at least 1")
        worker = CeleryWorkerChild(Path(settings.DATA_DIR)) if options["celery"] else None
        if worker is not None:
            worker.start()
        try:
            self._serve(options)
        finally:
            if worker is not None:
                worker.stop()

    def _serve(self, options: dict[str, Any]) -> None:
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

        from gateway.conf.server import LimitedHttpToolsProtocol

        if options["workers"] > 1 and settings.GATEWAY_METRICS:
            prepare_multiprocess_metrics(Path(settings.DATA_DIR))

        uvicorn.run(
            "gateway.conf.asgi:application",
            host=host,
            port=port,
            workers=options["workers"],
            loop="uvloop",
            http=LimitedHttpToolsProtocol,
            ws="websockets-sansio",  # /v1/responses over a WebSocket (gateway/dataplane/socket.py)
            ws_max_size=settings.GATEWAY_MAX_BODY_BYTES,
            lifespan="on",
            log_level="warning",
            access_log=False,
            # uvicorn counts the connection asking too: N + 1 serves N connections at once.
            limit_concurrency=settings.GATEWAY_MAX_CONNECTIONS + 1,
            timeout_keep_alive=settings.GATEWAY_KEEP_ALIVE_TIMEOUT,
            proxy_headers=bool(settings.GATEWAY_FORWARDED_ALLOW_IPS),
            forwarded_allow_ips=settings.GATEWAY_FORWARDED_ALLOW_IPS or None,
            timeout_graceful_shutdown=10,
        )
