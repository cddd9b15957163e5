"""The prober: tests accounts the data plane stopped using, or suspects, and re-admits them.

One :class:`Prober` runs inside each serving process (the data plane's Runtime starts
and closes it), so re-admission needs nothing else running. Every ``PROBE_TICK``
seconds it looks at the health store's records (a dict, no I/O) and probes:

- an open circuit whose trial is due: the prober *is* the half-open trial, so no
  tenant request is one (the store reads a due trial as DENY while a prober runs);
- a DISABLED account, ``DISABLED_PROBE_INTERVAL`` seconds after it was disabled, then
  again every ``DISABLED_PROBE_INTERVAL`` seconds (per replica) while it stays disabled;
- at once, an account a tenant's request made suspect (``HealthMachine.wants_probe``: a
  401/403, or server errors from one tenant's requests that reached the threshold).

Each probe first takes the store's per-account probe lock (``try_lock_probe``; with Redis
a ``SET NX`` shared by every replica), so one probe per account runs at a time
whichever replica starts it. The lock is released by the probe's report.

The probe is a real, minimal ``POST {base_url}/responses`` (``input: "ping"``,
``max_output_tokens: 16``, ``store: false``; 16 is the smallest the OpenAI API
accepts) through ``accounts.upstream.client.UpstreamClient``, with the account's credential and
its first model (by name). Not ``GET /models``: on several OpenAI-compatible services
that route is public or served by another component, so it would re-admit a revoked
key or a broken ``/responses``. A probe costs a few tokens, and only accounts that
failed are probed.

How an answer is read (a probe's answer is a verdict: its events carry no tenant):

=====================  ==========================  ==============================  ==========================
answer                 DISABLED                    CIRCUIT_OPEN (the trial)        HEALTHY (suspect)
=====================  ==========================  ==============================  ==========================
2xx, other 4xx         re-admitted                 healthy                         counters cleared
429                    re-admitted, cooling        cooling                         cooling
401 / 403              stays disabled              disabled                        disabled
5xx, 408, no answer    stays disabled              open again, longer              circuit open
=====================  ==========================  ==============================  ==========================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from accounts.health.machine import (
    Event,
    RateLimited,
    Reset,
    ServerError,
    State,
    Success,
    event_for_exception,
    event_for_status,
)
from accounts.infra.redis import raise_if_cancelled
from accounts.upstream.account import AccountInfo

if TYPE_CHECKING:
    from accounts.health.store import LocalHealthStore

logger = logging.getLogger(__name__)

PROBE_MAX_OUTPUT_TOKENS = 16
PROBE_CONCURRENCY = 10
PROBE_TICK = 1.0  # how often the store's records are looked at (a due trial waits at most this)
DISABLED_PROBE_INTERVAL = 5.0  # a DISABLED account is probed at most this often (per replica)
SLOW_TARGETS_SECONDS = 5.0  # reading the accounts to probe (the config snapshot) slower than this is logged


Targets = Callable[[], Awaitable[Iterable[AccountInfo]]]


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    account_id: int
    before: State
    status: int | None  # None: no HTTP answer
    after: State


def probe_body(model: str) -> bytes:
    return orjson.dumps({"model": model, "input": "ping", "max_output_tokens": PROBE_MAX_OUTPUT_TOKENS, "store": False})


async def probe_one(client: Any, target: AccountInfo) -> tuple[int | None, Event, str]:
    """Send one probe through ``client`` (an ``UpstreamClient``, or a stub with its ``post``).

    Returns the HTTP status (None: no answer), the answer read as a health event (an
    answer that says nothing about the account, as a 400, reads as success) and a detail.
    """
    headers = {"content-type": "application/json", "accept": "application/json"}
    if target.credential:
        headers["authorization"] = f"Bearer {target.credential}"
    try:
        reply = await client.post(target.responses_url, headers, probe_body(min(target.models)))
    except Exception as exc:
        return None, event_for_exception(exc) or ServerError("error"), str(exc)
    event = event_for_status(reply.status, reply.headers, reply.content, time.time())
    return reply.status, event or Success(), f"HTTP {reply.status}"


class Prober:
    """Probes due, disabled and suspect accounts of ``store`` in the background (module docstring).

    ``targets`` returns the accounts the process serves (the config snapshot's); ``client``
    is the process's ``UpstreamClient``. :meth:`start` and :meth:`aclose` bracket it;
    :meth:`run_once` is one round (tests call it directly).
    """

    def __init__(
        self,
        store: LocalHealthStore,
        client: Any,
        targets: Targets,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._client = client
        self._targets = targets
        self._clock = clock
        self._suspects: set[int] = set()
        self._next_disabled: dict[int, float] = {}  # account id -> earliest next probe
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._gate = asyncio.Semaphore(PROBE_CONCURRENCY)

    def start(self) -> None:
        """Start probing in the running loop; from now on no tenant request is a half-open trial."""
        if self._task is None:
            self.store.trials_by_prober = True
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        self.store.trials_by_prober = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def consider(self, account_id: int, event: Event) -> None:
        """After a tenant request's ``event`` was reported: probe the account now if it asks for it."""
        if self.store.machine.wants_probe(self.store.health(account_id), event):
            if account_id not in self._suspects:
                logger.info("account %s is suspect (%s): a probe is queued", account_id, type(event).__name__)
            self._suspects.add(account_id)
            self._wake.set()

    def due(self, now: float) -> set[int]:
        """The accounts to probe now (suspects included)."""
        due = set(self._suspects)
        for account_id, health in self.store.states().items():
            if health.state is State.CIRCUIT_OPEN:
                wanted = health.until is None or health.until <= now  # the trial is due
            else:  # disabled: first probed DISABLED_PROBE_INTERVAL after the transition
                wanted = health.state is State.DISABLED and now >= max(
                    health.since + DISABLED_PROBE_INTERVAL, self._next_disabled.get(account_id, 0.0)
                )
            if wanted:
                due.add(account_id)
        return due

    async def run_once(self) -> list[ProbeOutcome]:
        """One round: probe every due account whose probe lock this process gets."""
        now = self._clock()
        suspects = set(self._suspects)
        due = self.due(now)
        self._suspects.clear()
        if not due:
            return []
        asked = time.monotonic()
        targets = {target.account_id: target for target in await self._targets() if target.account_id in due}
        if (took := time.monotonic() - asked) > SLOW_TARGETS_SECONDS:
            logger.warning("the accounts to probe took %.1fs to read", took)
        for account_id in suspects - targets.keys():
            logger.warning("suspect account %s not probed: this process's configuration does not serve it", account_id)
        locked = []
        for account_id, target in targets.items():
            if await self.store.try_lock_probe(account_id, now):
                locked.append(target)
            elif account_id in suspects:
                logger.info("account %s not probed here: its probe lock is held (another replica's probe)", account_id)
        return list(await asyncio.gather(*(self._probe(target) for target in locked)))

    async def _probe(self, target: AccountInfo) -> ProbeOutcome:
        account_id = target.account_id
        before = self.store.health(account_id).state
        async with self._gate:  # cancelled (shutdown): the lock expires after policy.trial_ttl
            logger.info("probing account %s (%s)", account_id, before.value)
            status, event, detail = await probe_one(self._client, target)
        if before is State.DISABLED and isinstance(event, Success | RateLimited):
            await self.store.report(account_id, Reset(f"probe succeeded ({detail})"))
        await self.store.report(account_id, event)  # also releases the probe lock
        after = self.store.health(account_id).state
        if after is State.DISABLED:
            self._next_disabled[account_id] = self._clock() + DISABLED_PROBE_INTERVAL
        else:
            self._next_disabled.pop(account_id, None)
        logger.info("probe of account %s (%s): %s, now %s", account_id, before.value, detail, after.value)
        return ProbeOutcome(account_id, before, status, after)

    async def _run(self) -> None:
        while True:
            raise_if_cancelled()  # a cancellation swallowed whole inside a round still ends it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), PROBE_TICK)
            self._wake.clear()
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("probing accounts failed; next round in %.0fs", PROBE_TICK)
