"""The in-process prober (accounts/health/probing.py) and a tenant's evidence (machine.py).

The probe's outbound call goes through a stub of the ``UpstreamClient`` seam; the store is
a real LocalHealthStore (or two RedisHealthStores on one Redis, standing for two replicas,
when ``REDIS_URL`` is set). Time is a fake clock: no sleeps, no thresholds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import orjson

from accounts.health.machine import (
    Admission,
    AuthFailure,
    Event,
    HealthMachine,
    ServerError,
    State,
    Success,
)
from accounts.health.probing import DISABLED_PROBE_INTERVAL, Prober, probe_body
from accounts.health.store import LocalHealthStore
from accounts.routing.selection import FILL_FIRST, Selector
from accounts.upstream.account import AccountInfo
from accounts.upstream.client import UpstreamConnectError, UpstreamReply


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def Target(account_id: int, priority: int = 0) -> AccountInfo:
    return AccountInfo(
        account_id,
        responses_url="http://upstream.test/v1/responses",
        credential="sk-upstream-secret",
        models=frozenset({"gpt-b", "gpt-a"}),
        priority=priority,
    )


@dataclass
class StubClient:
    """The UpstreamClient seam: answers ``status`` (or raises ``error``) and keeps what was sent."""

    status: int = 200
    body: bytes = b"{}"
    error: Exception | None = None
    sent: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> UpstreamReply:
        self.sent.append((url, headers, body))
        if self.error is not None:
            raise self.error
        return UpstreamReply(self.status, httpx.Headers({}), self.body)


def scenario(body: Callable[[LocalHealthStore, Prober, StubClient, Clock], Awaitable[None]]) -> None:
    clock = Clock()
    client = StubClient()

    async def run() -> None:
        store = LocalHealthStore(clock=clock)

        async def targets() -> list[AccountInfo]:
            return [Target(1), Target(2)]

        prober = Prober(store, client, targets, clock=clock)
        await body(store, prober, client, clock)

    asyncio.run(run())


def test_a_disabled_account_is_probed_and_readmitted_once_its_key_works() -> None:
    async def body(store: LocalHealthStore, prober: Prober, client: StubClient, clock: Clock) -> None:
        await store.report(1, AuthFailure(401))  # a probe's verdict (no tenant): disabled
        client.status, client.body = 401, b'{"error":{"code":"invalid_api_key"}}'
        assert await prober.run_once() == []  # probed again only after the interval
        clock.now += DISABLED_PROBE_INTERVAL
        [outcome] = await prober.run_once()
        assert (outcome.account_id, outcome.before, outcome.status, outcome.after) == (
            1,
            State.DISABLED,
            401,
            State.DISABLED,
        )
        url, headers, sent = client.sent[0]
        assert url == "http://upstream.test/v1/responses"
        assert headers["authorization"] == "Bearer sk-upstream-secret"
        assert sent == probe_body("gpt-a")
        assert orjson.loads(sent)["max_output_tokens"] == 16
        # Not again before the interval: one probe per disabled account every few seconds.
        clock.now += DISABLED_PROBE_INTERVAL / 2
        assert await prober.run_once() == []
        client.status, client.body = 200, b"{}"
        clock.now += DISABLED_PROBE_INTERVAL
        [outcome] = await prober.run_once()
        assert outcome.after is State.HEALTHY
        assert store.health(1).reason == "probe succeeded (HTTP 200)"
        assert store.admission(1) is Admission.ADMIT
        assert await prober.run_once() == []  # nothing left to probe

    scenario(body)


def test_the_prober_makes_the_half_open_trial_and_requests_go_to_healthy_accounts() -> None:
    async def body(store: LocalHealthStore, prober: Prober, client: StubClient, clock: Clock) -> None:
        prober.start()
        try:
            for _ in range(3):
                await store.report(1, ServerError("503"))  # not a tenant's: opens at once
            assert store.health(1).state is State.CIRCUIT_OPEN
            clock.now = (store.health(1).until or 0) + 1  # the trial is due
            # No tenant request is the trial: the account is not admitted, the healthy one is.
            assert store.admission(1) is Admission.DENY
            selector = Selector(store, clock=clock)
            picked = selector.pick(9, [Target(1), Target(2, priority=1)], strategy=FILL_FIRST)
            assert picked is not None
            assert picked.account_id == 2
            assert selector.pick(9, [Target(1)], strategy=FILL_FIRST) is None
            assert store.blocked([1]).open == 1
            client.error = UpstreamConnectError("could not connect")
            [outcome] = await prober.run_once()
            assert (outcome.before, outcome.after) == (State.CIRCUIT_OPEN, State.CIRCUIT_OPEN)
            assert store.health(1).opens == 2  # open again, longer
            clock.now = (store.health(1).until or 0) + 1
            client.error = None
            [outcome] = await prober.run_once()
            assert outcome.after is State.HEALTHY
            assert store.health(1).reason == "trial request succeeded"
        finally:
            await prober.aclose()
        assert not store.trials_by_prober

    scenario(body)


def test_a_tenant_401_disables_only_when_a_probe_confirms_it() -> None:
    async def body(store: LocalHealthStore, prober: Prober, client: StubClient, clock: Clock) -> None:
        evidence = AuthFailure(401, "invalid_api_key", tenant=7)
        await store.report(1, evidence)
        assert store.health(1).state is State.HEALTHY  # evidence, not a verdict
        assert prober.due(clock.now) == set()
        prober.consider(1, evidence)
        assert prober.due(clock.now) == {1}
        [outcome] = await prober.run_once()  # the key works: nothing changes
        assert (outcome.status, outcome.after) == (200, State.HEALTHY)
        await store.report(1, evidence)
        prober.consider(1, evidence)
        client.status, client.body = 401, b'{"error":{"code":"invalid_api_key"}}'
        [outcome] = await prober.run_once()
        assert outcome.after is State.DISABLED
        assert store.health(1).reason == "upstream answered 401 (invalid_api_key): credential rejected"

    scenario(body)


def test_server_errors_of_one_tenant_open_the_circuit_only_when_a_probe_confirms() -> None:
    async def body(store: LocalHealthStore, prober: Prober, client: StubClient, clock: Clock) -> None:
        for _ in range(3):
            event: Event = ServerError("500", tenant=7)
            await store.report(1, event)
            prober.consider(1, event)
        assert store.health(1).state is State.HEALTHY
        assert prober.due(clock.now) == {1}
        [outcome] = await prober.run_once()  # the upstream serves the probe: counters cleared
        assert outcome.after is State.HEALTHY
        assert store.health(1).failures == 0
        for _ in range(3):
            event = ServerError("500", tenant=7)
            await store.report(1, event)
            prober.consider(1, event)
        client.status = 502
        [outcome] = await prober.run_once()  # the probe fails too: confirmed
        assert outcome.after is State.CIRCUIT_OPEN

    scenario(body)


def test_server_errors_of_two_tenants_open_the_circuit_without_a_probe() -> None:
    machine = HealthMachine()
    store = LocalHealthStore(machine, clock=Clock())

    async def run() -> None:
        for tenant in (7, 7, 8):
            await store.report(1, ServerError("500", tenant=tenant))
        assert store.health(1).state is State.CIRCUIT_OPEN
        assert not machine.wants_probe(store.health(1), ServerError("500", tenant=8))
        await store.report(2, Success())
        assert not machine.wants_probe(store.health(2), Success())

    asyncio.run(run())


def test_a_held_probe_lock_skips_the_account() -> None:
    async def body(store: LocalHealthStore, prober: Prober, client: StubClient, clock: Clock) -> None:
        await store.report(1, AuthFailure(403))
        clock.now += DISABLED_PROBE_INTERVAL
        assert await store.try_lock_probe(1)
        assert await prober.run_once() == []
        assert client.sent == []
        await store.report(1, AuthFailure(403))  # any report releases it
        assert [o.account_id for o in await prober.run_once()] == [1]

    scenario(body)
