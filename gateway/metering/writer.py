"""The usage writer process: usage reaches the database outside the serving process.

Each gateway process starts one child, ``python -m gateway.metering.writer``, at its first
request (or lifespan start-up), with a pipe on the child's stdin as its lifeline. The
child writes usage to the database, so the serving process's event loop never shares
its GIL with a database write (docs/performance.md):

- embedded (no Redis): it drains the journal, ``DATA_DIR/usage-journal``
  (:class:`gateway.metering.journal.JournalDrainer`, one active per directory);
- with Redis: it drains the usage stream (``gateway.metering.stream.run_drainer``), as
  ``manage.py usage_drain`` does.

When its stdin reaches end of file (the parent closed it at shutdown, after its last
append, or the parent died), the child writes what is left and exits. SIGINT and
SIGTERM are ignored: a Ctrl-C or a service manager signals the whole process group, and
the parent's last records must land before the child's last pass.

``GATEWAY_USAGE_WRITER=thread`` runs the same drainers in the gateway process instead
(``Runtime``), and ``GATEWAY_USAGE_DRAINER=false`` runs none (``manage.py usage_drain``
does the work elsewhere).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# How often the child looks at the journal for new lines.
POLL_SECONDS = 0.2
# At shutdown, how long the child waits for writers to let go of their segments.
FINAL_WAIT_SECONDS = 5.0
# How long a stopping parent waits for the child's last pass.
STOP_WAIT_SECONDS = 15.0


def journal_dir() -> Path:
    from django.conf import settings

    return Path(settings.DATA_DIR) / "usage-journal"


def spool_dir() -> Path:
    from django.conf import settings

    return Path(settings.DATA_DIR) / "usage-spool"


class UsageWriterProcess:
    """The parent's handle on its usage writer child."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        from django.conf import settings

        env = dict(os.environ)
        env.setdefault("DJANGO_SETTINGS_MODULE", settings.SETTINGS_MODULE)
        # The project root first, whatever directory the server was started from.
        root = str(settings.BASE_DIR)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.metering.writer"], stdin=subprocess.PIPE, env=env, cwd=root
        )
        logger.info("usage writer process started (pid %d)", self._proc.pid)

    def stop(self, wait: float = STOP_WAIT_SECONDS) -> None:
        """Close the lifeline and wait for the child's last pass (call after the last append)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            logger.warning("usage writer (pid %d) still busy after %.0fs; it finishes on its own", proc.pid, wait)


def _stdin_closed(timeout: float) -> bool:
    """Wait up to ``timeout`` for the lifeline; True once it is closed (the parent never writes)."""
    readable, _, _ = select.select([0], [], [], timeout)
    return bool(readable) and not os.read(0, 4096)


def _run_journal() -> None:
    from gateway.metering.journal import JournalDrainer, drain_until

    drainer = JournalDrainer(journal_dir(), extra_dirs=[spool_dir()])
    drain_until(drainer, _stdin_closed, poll=POLL_SECONDS)
    if not drainer.acquire():
        return  # another process is the active drainer: it writes what is left
    try:
        drainer.drain(wait=FINAL_WAIT_SECONDS)
    except Exception:
        logger.exception("usage left in %s for the next start", drainer.directory)


async def _run_stream() -> None:
    import redis.asyncio as aioredis
    from django.conf import settings

    from gateway.metering.stream import UsageDrainer, run_drainer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stdin() -> None:
        if not os.read(0, 4096):
            loop.remove_reader(0)
            stop.set()

    loop.add_reader(0, on_stdin)
    redis = aioredis.Redis.from_url(settings.REDIS_URL)
    consumer = f"{socket.gethostname()}-{os.getpid()}-writer"
    try:
        await run_drainer(redis, stop=stop, block_ms=1000, consumer=consumer)
        # A last pass for what the parent added while it stopped.
        deadline = time.monotonic() + FINAL_WAIT_SECONDS
        while time.monotonic() < deadline:
            try:
                await UsageDrainer(redis, consumer=consumer).drain()
                break
            except Exception:
                logger.warning("last usage pass failed; entries stay in the stream", exc_info=True)
                await asyncio.sleep(0.5)
    finally:
        await redis.aclose()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import django

    django.setup()
    gc.freeze()  # Django's import-time objects: out of the collector's walks for good
    from django.conf import settings

    # Writing usage can wait a little; a request cannot. On a busy machine the scheduler
    # then hands the CPU to the serving process first (its tail latency, docs/performance.md),
    # while the writer still gets a share and catches up when the load eases.
    os.nice(settings.GATEWAY_USAGE_WRITER_NICE)

    if settings.REDIS_URL:
        asyncio.run(_run_stream())
    else:
        _run_journal()


if __name__ == "__main__":
    main()
