"""The gauges of a serving process, sampled in the background every
``GATEWAY_METRICS_SAMPLE_SECONDS`` (never on the request path).

What it reads is passed in as callables, so this module knows nothing of the runtime:
each account's health (a dict in memory), the dependencies readiness reports down, the
usage writer's state, the usage backlog (one Redis call, or a directory listing), the
records held in memory, and the config snapshot in force.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from accounts.health.machine import Health, State
from accounts.infra.redis import raise_if_cancelled
from gateway.observability.metrics import Metrics

logger = logging.getLogger(__name__)

DEPENDENCIES = ("redis", "database", "journal", "usage_writer")


@dataclass(slots=True)
class Sources:
    """Where each gauge's value comes from."""

    health: Callable[[], dict[int, Health]]  # account id -> health (non-default records)
    accounts: Callable[[], list[int]]  # every account id the snapshot serves
    down: Callable[[], set[str]]  # dependencies reported down
    writer_up: Callable[[], bool]
    pending: Callable[[], int]  # usage records held in this process's memory
    backlog: Callable[[], Awaitable[int]]
    snapshot: Callable[[], tuple[float, float] | None]  # (version, built_at monotonic) or None
    budgets: Callable[[], Awaitable[dict[int, float]]]  # tenant id -> USD left (tenant labels on)


class Sampler:
    """Sets the gauges of :class:`Metrics` from :class:`Sources`; :meth:`start` runs it periodically."""

    def __init__(self, metrics: Metrics, sources: Sources, interval: float) -> None:
        self.metrics = metrics
        self.sources = sources
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = self._task or asyncio.ensure_future(self._run())

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # its own failures were logged

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:  # a failed sample is retried at the next interval (a cancellation ends it)
                raise_if_cancelled()
                logger.warning("sampling the gauges failed", exc_info=True)
            raise_if_cancelled()  # a cancellation a library swallowed whole (no exception) still ends it
            await asyncio.sleep(self.interval)

    async def sample(self) -> None:
        """Set every gauge now."""
        m, s = self.metrics, self.sources
        states = s.health()
        for account in set(s.accounts()) | set(states):
            health = states.get(account)
            current = health.state if health is not None else State.HEALTHY
            for state in State:
                m.account_health.labels(str(account), state.value).set(1 if state is current else 0)
        down = s.down()
        for name in DEPENDENCIES:
            m.dependency_up.labels(name).set(0 if name in down else 1)
        m.writer_up.set(1 if s.writer_up() else 0)
        m.usage_pending.set(s.pending())
        m.usage_backlog.set(await s.backlog())
        for tenant, remaining in (await s.budgets()).items():
            m.budget_remaining.labels(str(tenant)).set(remaining)
        snapshot = s.snapshot()
        if snapshot is not None:
            version, built_at = snapshot
            m.snapshot_version.set(version)
            m.snapshot_age.set(time.monotonic() - built_at)
