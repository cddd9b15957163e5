"""``manage.py serve --celery`` (what ``make run`` runs): the Celery worker child's life.

That it does the work (a budget alert delivered to a webhook by the child) is
``test_live_limits.py::test_alerts_are_sent_to_the_webhook_once[celery child]``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

from tests import harness as live


def celery_child(gateway: live.LiveProcess) -> live.Child:
    """The gateway's one Celery worker child."""
    assert gateway.proc is not None
    parent = gateway.proc.pid

    def workers() -> list[int]:
        return [pid for pid in live.children(parent) if "celery" in live.cmdline(pid)[1:3]]

    [pid] = live.poll(workers, what="a celery worker child")
    assert live.cmdline(pid)[1:6] == ["-m", "celery", "-A", "gateway.conf.celery", "worker"]
    return live.Child.of(pid)


def test_a_killed_celery_worker_is_restarted_and_stopped_with_the_gateway(
    start_gateway: Callable[..., live.LiveProcess],
) -> None:
    gateway = start_gateway(args=("--celery",))
    first = celery_child(gateway)
    first.signal(signal.SIGKILL)
    live.poll(lambda: not first.running(), what="the killed worker reaped")

    def replacement() -> live.Child | None:
        child = celery_child(gateway)
        return child if child != first else None

    second = live.poll(replacement, timeout=15, what="a new worker")
    assert second is not None
    assert second.running()
    # uvicorn re-raises the SIGTERM once it has shut down; the worker gets its own SIGTERM.
    assert gateway.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    live.poll(lambda: not second.running(), timeout=30, what="the worker stopping with its gateway")
    assert "the celery worker (pid" in gateway.log.read_text()


def test_a_celery_worker_does_not_outlive_a_killed_gateway(start_gateway: Callable[..., live.LiveProcess]) -> None:
    gateway = start_gateway(args=("--celery",))
    worker = celery_child(gateway)
    assert gateway.stop(signal.SIGKILL) == -signal.SIGKILL
    live.poll(lambda: not worker.running(), timeout=30, what="the orphaned worker exiting")
