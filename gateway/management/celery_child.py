"""A Celery worker (with its beat scheduler) as a supervised child of ``manage.py serve --celery``.

The embedded default runs on one machine with one command (``make run``): the gateway
process starts one worker, ``celery -A gateway.conf.celery worker -B``, on the same broker as
the rest of the process (kombu's filesystem transport under ``DATA_DIR/celery``, or Redis
when ``REDIS_URL`` is set), so budget-alert webhooks and every periodic task run without a
second command. In production run one worker (with ``-B``) per deployment instead, not one per
replica (a beat per replica would schedule every periodic task once per replica).

Contract: :meth:`CeleryWorkerChild.start` starts the child and a supervisor thread; a child
that exits while the gateway serves is logged and started again after 1 s, doubling up to
30 s while it keeps exiting. :meth:`CeleryWorkerChild.stop` asks the child for a warm
shutdown (SIGTERM: running tasks finish) and kills it after ``STOP_WAIT_SECONDS``. The
child also gets SIGTERM from the kernel when the thread that started it dies: so when the
gateway ends by a signal (uvicorn re-raises a SIGTERM after its own shutdown, so ``stop``
never runs) or is SIGKILLed, no worker outlives its gateway.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from gateway.conf.files import private_directory

logger = logging.getLogger(__name__)

RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0
STOP_WAIT_SECONDS = 20.0
_PR_SET_PDEATHSIG = 1
_prctl: Callable[[int, int], int] | None
try:  # looked up before any fork: the child only calls it
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM this child when the thread that forked it dies."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class CeleryWorkerChild:
    """One ``celery worker -B`` child, restarted with a backoff until :meth:`stop`."""

    def __init__(self, data_dir: Path, *, concurrency: int = 2) -> None:
        # The beat keeps its schedule there (also with the Redis broker, which needs no folder).
        private_directory(data_dir / "celery")
        self._args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "gateway.conf.celery",
            "worker",
            "--beat",
            "--schedule",
            str(data_dir / "celery" / "beat-schedule"),
            "--pool",
            "threads",
            "--concurrency",
            str(concurrency),
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
        ]
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # a child is never started after stop() looked for one
        self._thread: threading.Thread | None = None
        self.restarts = 0

    def start(self) -> None:
        """Start the worker and the thread that keeps it running."""
        self._thread = threading.Thread(target=self._supervise, name="celery-worker-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self._args, preexec_fn=_die_with_parent)
        logger.info("celery worker started (pid %d)", proc.pid)
        return proc

    def _supervise(self) -> None:
        delay = RESTART_DELAY
        while not self._stopping.is_set():
            try:
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self._proc = self._spawn()
            except OSError as exc:
                logger.error("could not start a celery worker (%s); retrying in %.0fs", exc, delay)
            else:
                code = self._proc.wait()
                if self._stopping.is_set():
                    return
                logger.error(
                    "the celery worker (pid %d) exited with status %s; restarting in %.0fs", self._proc.pid, code, delay
                )
                self.restarts += 1
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, RESTART_DELAY_MAX)

    def pid(self) -> int | None:
        """The running child's pid (None before it started)."""
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        """Warm shutdown of the child (running tasks finish), then kill it if it lingers."""
        with self._lock:
            self._stopping.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning("celery worker (pid %d) still running after %.0fs; killed", proc.pid, STOP_WAIT_SECONDS)
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(STOP_WAIT_SECONDS)
