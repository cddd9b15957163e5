"""The usage writer process: usage reaches the database outside the serving process.

Each gateway process runs one child, ``python -m gateway.metering.writer``, started with
the data plane (lifespan start-up, or the first request under Daphne), with a pipe on
the child's stdin as its lifeline. The child writes usage to the database, so the
serving process's event loop never shares its GIL with a database write
(docs/performance.md). It runs the one drain loop (:mod:`gateway.metering.drain`) over

- embedded (no Redis): the journal, ``DATA_DIR/usage-journal``
  (:class:`~gateway.metering.journal.JournalDrainer`, one active drainer per directory);
- with Redis: the usage stream (:class:`~gateway.metering.stream.UsageDrainer`), as
  ``manage.py usage_drain`` does.

When its stdin reaches end of file (the parent closed it at shutdown, after its last
append, or the parent died), the child makes its last pass and exits. SIGINT and
SIGTERM are ignored: a Ctrl-C or a service manager signals the whole process group, and
the parent's last records must land before the child's last pass.

The parent supervises it (:class:`UsageWriterProcess`): a child that exits while the
parent still serves (killed, crashed) is reaped, logged and restarted with a growing
backoff, and its state is reported (``on_state``: the data plane's readiness). Records
wait in the journal or the stream meanwhile; nothing is lost.
``GATEWAY_USAGE_DRAINER=false`` runs no child (``manage.py usage_drain`` does the work
elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from gateway.metering.drain import Source, drain

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


# Writing usage can wait a little; a request cannot. With the child niced, a busy machine's
# scheduler hands the CPU to the serving process first (its tail latency, docs/performance.md)
# while the writer still gets a share and catches up when the load eases.
WRITER_NICENESS = 10
# A child that dies is restarted after this delay, doubling up to the maximum; one that
# lived this long before it died starts the backoff over.
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
STABLE_SECONDS = 30.0


class UsageWriterProcess:
    """The parent's handle on its usage writer child, supervised on the event loop.

    ``on_state(reason)`` is called when the child died (it is being restarted) and
    ``on_state(None)`` when a new one started. :meth:`stop` closes the lifeline and waits
    for the child's last pass.
    """

    def __init__(self, on_state: Callable[[str | None], object] | None = None) -> None:
        self._on_state = on_state
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Start the child and its supervisor; a child that cannot be started is retried by it."""
        try:
            self._proc = await self._spawn()
        except OSError as exc:
            logger.error("could not start a usage writer (%s); retrying in %.1fs", exc, RESTART_DELAY)
            self._report(f"the usage writer could not be started: {exc}")
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        self._supervisor.add_done_callback(_log_failure)

    async def _spawn(self) -> asyncio.subprocess.Process:
        from django.conf import settings

        env = dict(os.environ)
        env.setdefault("DJANGO_SETTINGS_MODULE", settings.SETTINGS_MODULE)
        # The project root first, whatever directory the server was started from.
        root = str(settings.BASE_DIR)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.metering.writer", stdin=subprocess.PIPE, env=env, cwd=root
        )
        logger.info("usage writer process started (pid %d)", proc.pid)
        return proc

    async def _supervise(self) -> None:
        """Reap the child when it exits; while serving, start another after the backoff."""
        delay = RESTART_DELAY
        while True:
            proc = self._proc
            if proc is not None:
                started = time.monotonic()
                code = await proc.wait()
                if self._stopping:
                    return
                if time.monotonic() - started >= STABLE_SECONDS:
                    delay = RESTART_DELAY
                reason = f"the usage writer (pid {proc.pid}) exited with status {code}; restarting in {delay:.1f}s"
                logger.error("%s; usage waits in the journal or the stream meanwhile", reason)
                self._report(reason)
                self._proc = None
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_DELAY_MAX)
                try:
                    self._proc = await self._spawn()
                    break
                except OSError as exc:
                    logger.error("could not start a usage writer (%s); retrying in %.1fs", exc, delay)
            self.restarts += 1
            self._report(None)

    def _report(self, reason: str | None) -> None:
        if self._on_state is not None:
            self._on_state(reason)

    async def stop(self, wait: float = STOP_WAIT_SECONDS) -> None:
        """Close the lifeline and wait for the child's last pass (call after the last append)."""
        self._stopping = True
        proc, self._proc = self._proc, None
        if self._supervisor is not None:
            self._supervisor.cancel()
            # A supervisor that failed was logged when it did (_log_failure): the child is stopped all the same.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
            self._supervisor = None
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), wait)
        except TimeoutError:
            logger.warning("usage writer (pid %d) still busy after %.0fs; it finishes on its own", proc.pid, wait)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error(
            "the usage writer's supervisor failed; the writer is no longer restarted", exc_info=task.exception()
        )


@contextlib.asynccontextmanager
async def opened_source(
    *, consumer: str | None = None, batch: int = 500, stream: str | None = None
) -> AsyncIterator[Source]:
    """The source this deployment drains: the Redis stream when ``REDIS_URL`` is set, else the journal."""
    from django.conf import settings

    if settings.REDIS_URL:
        import redis.asyncio as aioredis

        from gateway.metering.stream import STREAM, StreamSource, UsageDrainer

        redis = aioredis.Redis.from_url(settings.REDIS_URL)
        try:
            yield StreamSource(UsageDrainer(redis, consumer=consumer, batch=batch, stream=stream or STREAM))
        finally:
            await redis.aclose()
        return
    from gateway.metering.journal import JournalDrainer, JournalSource

    drainer = JournalDrainer(journal_dir(), batch=batch, extra_dirs=[spool_dir()])
    try:
        yield JournalSource(drainer)
    finally:
        drainer.release()


async def _serve() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stdin() -> None:
        if not os.read(0, 4096):
            loop.remove_reader(0)
            stop.set()

    loop.add_reader(0, on_stdin)
    async with opened_source(consumer=f"{socket.gethostname()}-{os.getpid()}-writer") as source:
        await drain(source, stop, idle=POLL_SECONDS, last=FINAL_WAIT_SECONDS)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import django

    django.setup()
    os.nice(WRITER_NICENESS)
    asyncio.run(_serve())


if __name__ == "__main__":
    main()
