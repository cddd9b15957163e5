"""Probing accounts the data plane stopped using, and re-admitting those that recovered.

Which accounts: enabled ones that are DISABLED by an upstream auth failure, or whose
circuit is open and due a trial (operator-disabled accounts are never probed). Their
state comes from Redis when configured, else from the latest recorded transitions.

The probe is a real, minimal ``POST {base_url}/responses`` (``input: "ping"``,
``max_output_tokens: 16``, ``store: false``; 16 is the smallest the OpenAI API
accepts) through ``accounts.upstream.client.UpstreamClient``, with the account's credential and
its first listed model. Not ``GET /models``: on several OpenAI-compatible services
that route is public or served by another component, so it would re-admit a revoked
key or a broken ``/responses``. A probe costs a few tokens, and only accounts that
already failed are probed.

How an answer is read (``probe_verdict``):

=====================  ====================================  ==============================
answer                 DISABLED                              CIRCUIT_OPEN (half-open)
=====================  ====================================  ==============================
2xx, other 4xx         re-admit (the credential is accepted) re-admit (the upstream answers)
429                    re-admit, then cool down              cool down
401 / 403              stays disabled                        disabled
5xx, 408, no answer    stays disabled (inconclusive)         open again, longer
=====================  ====================================  ==============================

Re-admission goes through ``accounts.services.account_health_reset`` (Redis record +
``health_reset_at`` in the snapshot, so embedded replicas see it too). Other outcomes
are applied to the shared Redis record; in embedded mode the gateway process owns the
state, so only re-admissions reach it (its own half-open trials handle the rest).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from accounts.health.machine import (
    AuthFailure,
    Event,
    HealthMachine,
    HealthPolicy,
    RateLimited,
    ServerError,
    State,
    event_for_exception,
    event_for_status,
)

logger = logging.getLogger(__name__)

PROBE_MAX_OUTPUT_TOKENS = 16
PROBE_CONCURRENCY = 10
PROBE_CONNECT_TIMEOUT = 5.0
PROBE_READ_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class ProbeResult:
    account_id: int
    status: int | None  # None: no HTTP answer
    event: Event | None  # the answer read as a health event (accounts.health.machine.event_for_*)
    detail: str


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    account_id: int
    before: State
    verdict: str  # readmitted | cooling | disabled | reopened | unchanged | skipped
    detail: str


def probe_verdict(before: State, result: ProbeResult) -> tuple[str, list[Event]]:
    """What a probe answer means for an account in ``before`` (the module's table).

    Returns the verdict and the events to apply to the shared record after any
    re-admission (``readmitted`` and ``cooling`` from DISABLED both re-admit first).
    """
    event = result.event
    if before is State.DISABLED:
        if isinstance(event, AuthFailure):
            return "unchanged", []
        if isinstance(event, RateLimited):
            return "cooling", [event]
        if isinstance(event, ServerError):
            return "unchanged", []
        return "readmitted", []
    if isinstance(event, ServerError):
        return "reopened", [event]
    if isinstance(event, AuthFailure):
        return "disabled", [event]
    if isinstance(event, RateLimited):
        return "cooling", [event]
    return "readmitted", []


def probe_candidates(now: float | None = None) -> dict[int, State]:
    """Enabled accounts to probe now, with their state (see the module docstring)."""
    from accounts.models import UpstreamAccount
    from accounts.selectors import account_health_states

    now = time.time() if now is None else now
    ids = list(UpstreamAccount.objects.filter(enabled=True).values_list("pk", flat=True))
    candidates: dict[int, State] = {}
    for account_id, health in account_health_states(ids).items():
        if health.state is State.DISABLED or (
            health.state is State.CIRCUIT_OPEN and (health.until is None or health.until <= now)
        ):
            candidates[account_id] = health.state
    return candidates


def probe_body(model: str) -> bytes:
    return orjson.dumps({"model": model, "input": "ping", "max_output_tokens": PROBE_MAX_OUTPUT_TOKENS, "store": False})


async def probe_rows(rows: Sequence[dict[str, Any]], client: Any = None) -> list[ProbeResult]:
    """Send one probe per account row (``accounts_for_probe`` shape), a few at a time.

    ``client``: a ``accounts.upstream.client.UpstreamClient`` (or a stub with its ``post``);
    one is created, and closed, when None.
    """
    from django.conf import settings

    from accounts.upstream.client import UpstreamClient

    own = client is None
    if client is None:
        client = UpstreamClient(
            transport=settings.GATEWAY_UPSTREAM_TRANSPORT,
            connect_timeout=PROBE_CONNECT_TIMEOUT,
            read_timeout=PROBE_READ_TIMEOUT,
            max_connections=PROBE_CONCURRENCY,
        )
    gate = asyncio.Semaphore(PROBE_CONCURRENCY)

    async def one(row: dict[str, Any]) -> ProbeResult:
        headers = {"content-type": "application/json", "accept": "application/json"}
        if row.get("credential"):
            headers["authorization"] = f"Bearer {row['credential']}"
        url = row["base_url"].rstrip("/") + "/responses"
        async with gate:
            try:
                reply = await client.post(url, headers, probe_body(row["models"][0]))
            except Exception as exc:
                return ProbeResult(row["id"], None, event_for_exception(exc) or ServerError("error"), str(exc))
        event = event_for_status(reply.status, reply.headers, reply.content, time.time())
        return ProbeResult(row["id"], reply.status, event, f"HTTP {reply.status}")

    try:
        return list(await asyncio.gather(*(one(row) for row in rows)))
    finally:
        if own:
            await client.aclose()


def accounts_probe_run(account_ids: Iterable[int] | None = None, *, client: Any = None) -> list[ProbeOutcome]:
    """Probe the candidates (or those of ``account_ids`` that are candidates) and apply the verdicts.

    Synchronous: for the Celery task and commands. In Redis mode an account whose
    half-open trial a gateway already holds is skipped this round.
    """
    from accounts.health import store as health_store
    from accounts.models import UpstreamAccount
    from accounts.selectors import accounts_for_probe
    from accounts.services import account_health_reset, account_transitions_write

    candidates = probe_candidates()
    if account_ids is not None:
        wanted = set(account_ids)
        candidates = {k: v for k, v in candidates.items() if k in wanted}
    if not candidates:
        return []
    policy = HealthPolicy.from_settings()
    redis = health_store.sync_client()
    tokens: dict[int, str] = {}
    outcomes: list[ProbeOutcome] = []
    if redis is not None:
        for account_id, state in list(candidates.items()):
            if state is not State.CIRCUIT_OPEN:
                continue
            token = health_store.try_acquire_probe_sync(redis, account_id, policy.trial_ttl)
            if token is None:
                del candidates[account_id]
                outcomes.append(ProbeOutcome(account_id, state, "skipped", "a gateway holds the trial"))
            else:
                tokens[account_id] = token
    rows = accounts_for_probe(candidates)
    try:
        results = asyncio.run(probe_rows(rows, client))
        machine = HealthMachine(policy)
        for result in results:
            before = candidates[result.account_id]
            verdict, events = probe_verdict(before, result)
            if verdict == "readmitted" or (verdict == "cooling" and before is State.DISABLED):
                account = UpstreamAccount.objects.get(pk=result.account_id)
                account_health_reset(account=account, reason=f"probe succeeded ({result.detail})")
            if events and redis is not None:
                _, transitions = health_store.apply_sync(redis, result.account_id, events, time.time(), machine=machine)
                account_transitions_write(transitions)
            outcomes.append(ProbeOutcome(result.account_id, before, verdict, result.detail))
            logger.info("probe of account %s (%s): %s, %s", result.account_id, before, verdict, result.detail)
    finally:
        if redis is not None:
            for account_id, token in tokens.items():
                health_store.release_probe_sync(redis, account_id, token)
    return outcomes
