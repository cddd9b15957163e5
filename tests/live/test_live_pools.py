"""Upstream account pools through live gateways: routing, selection strategies, stickiness,
the health state machine, failover before the first byte, and (with PostgreSQL and Redis)
health and stickiness shared by two gateway processes.

Each failing account gets an upstream of its own (``live.KnobbedFake``: the fake upstream in a
thread of this process, with server-wide fault knobs), so one account can fail while another
serves; which upstream received a request tells which account was picked.

Account state is read the way an operator reads it (``account_health_states``: the shared
Redis record, or in embedded mode the latest recorded transition), always by polling: the
gateway writes both off the request path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from django.conf import settings

from accounts import services as account_services
from accounts.health.machine import Health, State
from accounts.models import AccountTransition, Pool, UpstreamAccount
from tests import harness as live
from tests.conftest import DATA_DIR, Live
from tests.harness import KnobbedFake, assert_error, poll, sse_events

pytestmark = pytest.mark.live

REDIS = bool(settings.REDIS_URL)
SHARED = REDIS and str(settings.DATABASES["default"]["ENGINE"]).endswith("postgresql")
MODEL = "pool-model"


def body(model: str = MODEL, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": model, "input": "hi", "stream": stream, **extra}


# --- fixtures and helpers ---------------------------------------------------------------------


def _forget_shared_health(account_ids: list[int]) -> None:
    """Drop the Redis health records of ``account_ids`` (no-op in embedded mode).

    A new test database reuses account ids, and a record a previous run left in Redis (a
    3600 s quota cooldown, a disabled credential) would otherwise apply to the new account:
    the gateways reset their mirror at the account's ``created_at``, but the shared record
    is not reset, and new events are folded onto it.
    """
    from accounts.health import store as health_store

    client = health_store.sync_client()
    if client is None or not account_ids:
        return
    prefix = health_store.settings_prefix()
    client.delete(
        *(health_store.account_key(prefix, i) for i in account_ids),
        *(health_store.probe_key(prefix, i) for i in account_ids),
    )
    client.srem(f"{prefix}:ids", *account_ids)


@dataclasses.dataclass
class Pools:
    """One test's pools: upstreams, accounts, requests (to any gateway) and account state."""

    live: Live
    fakes: list[KnobbedFake] = dataclasses.field(default_factory=list)
    elsewhere: list[str] = dataclasses.field(default_factory=list)  # request ids served by other gateways
    synced: set[str] = dataclasses.field(default_factory=set)  # gateways that saw the last addition

    def fake(self, **config: Any) -> KnobbedFake:
        upstream = KnobbedFake(history=500, **config)
        self.fakes.append(upstream)
        return upstream

    def account(
        self, upstream: KnobbedFake | str, models: tuple[str, ...] = (MODEL,), pool: str = "pool", **options: Any
    ) -> UpstreamAccount:
        base_url = upstream if isinstance(upstream, str) else upstream.base_url
        account = self.live.add_account(list(models), base_url=base_url, pool=pool, **options)
        _forget_shared_health([account.pk])
        self.synced.clear()
        return account

    def key(self, **options: Any) -> str:
        _, secret = self.live.new_key(**options)
        self.synced.clear()
        return str(secret)

    def route(self, model: str, targets: list[tuple[str, str]]) -> None:
        account_services.model_route_set(model=model, targets=targets)
        self.synced.clear()

    def _sync(self, url: str) -> None:
        """Work around a Redis-mode gap in gateway/dataplane/responses.py: a gateway authenticates and plans a
        request on the snapshot of the change token it saw last, and only the admission that
        follows reads the new one, so a key, account or route *added* since is refused (401,
        404) once. ``GET /v1/models`` reads the token first; one per gateway after an addition."""
        if REDIS and url not in self.synced:
            with self.live.http() as client:
                client.get(url + "/v1/models")
            self.synced.add(url)

    def strategy(self, strategy: str, pool: str = "pool") -> None:
        account_services.pool_set_strategy(pool=Pool.objects.get(name=pool), strategy=strategy)

    def post(self, payload: dict[str, Any], url: str | None = None, key: str | None = None) -> httpx.Response:
        self._sync(url or self.live.url)
        with self.live.http(key) as client:
            response = client.post((url or self.live.url) + "/v1/responses", json=payload)
        if url is not None and url != self.live.url:
            self.elsewhere.append(response.headers["x-request-id"])
        return response

    def served(self, payload: dict[str, Any], url: str | None = None, key: str | None = None) -> httpx.Response:
        """A request the client must see succeed."""
        response = self.post(payload, url, key)
        assert response.status_code == 200, response.text[:500]
        return response

    def record(self, response: httpx.Response) -> Any:
        return self.live.wait_usage(response.headers["x-request-id"])

    @contextlib.contextmanager
    def held(self, url: str | None = None, model: str = MODEL) -> Iterator[None]:
        """A stream kept open (one slow frame after another) until the block ends: while it
        lasts, its account has one request in flight. The client hangs up at the end."""
        payload = body(model, True, metadata={"fake_event_delay_ms": "100", "fake_tokens": "600"})
        self._sync(url or self.live.url)
        with (
            self.live.http() as client,
            client.stream("POST", (url or self.live.url) + "/v1/responses", json=payload) as response,
        ):
            assert response.status_code == 200
            # Read up to real output (the gateway committed the stream). The iterator stays
            # referenced: an abandoned one would make httpx close the connection at once.
            chunks = response.iter_raw()
            seen = b""
            while b"response.output_text.delta" not in seen:
                seen += next(chunks)
            if url is not None and url != self.live.url:
                self.elsewhere.append(response.headers["x-request-id"])
            yield
            del chunks

    def close(self) -> None:
        for request_id in self.elsewhere:  # their usage must be written before the flush
            self.live.wait_usage(request_id)
        for upstream in self.fakes:
            upstream.close()


@pytest.fixture(name="pools")
def pools_fixture(live_gw: Live) -> Iterator[Pools]:
    _forget_shared_health([live_gw.account.pk])
    state = Pools(live_gw)
    yield state
    state.close()
    _forget_shared_health(list(UpstreamAccount.objects.values_list("pk", flat=True)))


@pytest.fixture(scope="module")
def quick_gateway(live_env: dict[str, str]) -> Iterator[str]:
    """A dedicated gateway whose upstream read timeout is short (for timeouts)."""
    port = live.free_port()
    env = {**live_env, "GATEWAY_UPSTREAM_READ_TIMEOUT": "1"}
    with live.running(live.gateway(port, env, DATA_DIR / "gateway-pools-quick.log")) as process:
        yield process.url


def health(account: UpstreamAccount) -> Health | None:
    from accounts.selectors import account_health_states

    return account_health_states([account.pk]).get(account.pk)


def wait_state(account: UpstreamAccount, state: State, reason: str = "") -> Health:
    """The account's health once it is ``state`` (with ``reason`` in its reason)."""

    def check() -> Health | None:
        current = health(account)
        return current if current is not None and current.state is state and reason in current.reason else None

    found = poll(check, what=f"account {account.pk} {state.value} ({reason})")
    assert found is not None
    return found


def transitions(account: UpstreamAccount) -> list[tuple[str, str, str]]:
    rows = AccountTransition.objects.filter(account=account).order_by("at", "pk")
    return [(row.from_state, row.to_state, row.reason) for row in rows]


def wait_transitions(account: UpstreamAccount, count: int) -> list[tuple[str, str, str]]:
    """The account's transitions, once at least ``count`` are recorded."""

    def check() -> list[tuple[str, str, str]] | None:
        rows = transitions(account)
        return rows if len(rows) >= count else None

    found = poll(check, what=f"{count} transitions of account {account.pk}")
    assert found is not None
    return found


def attempts(record: Any) -> list[tuple[int, str, int]]:
    return [(a["account_id"], a["outcome"], a["status"]) for a in record.attempts]


def received(*upstreams: KnobbedFake) -> tuple[int, ...]:
    return tuple(upstream.received for upstream in upstreams)


# --- routing ----------------------------------------------------------------------------------


def test_route_aliases_a_model_and_falls_back_to_the_second_pool(pools: Pools) -> None:
    primary, backup = pools.fake(), pools.fake()
    first = pools.account(primary, ("gpt-4o-2024-08-06",), pool="primary")
    second = pools.account(backup, ("gpt-4o-backup",), pool="backup")
    pools.route("gpt-4o", [("primary", "gpt-4o-2024-08-06"), ("backup", "gpt-4o-backup")])

    response = pools.served(body("gpt-4o"))
    assert primary.requests()[-1]["body"]["model"] == "gpt-4o-2024-08-06"
    assert backup.received == 0
    record = pools.record(response)
    assert (record.model, record.account_id, record.attempts) == ("gpt-4o", first.pk, [])

    primary.set(status="503")
    response = pools.served(body("gpt-4o"))
    assert backup.requests()[-1]["body"]["model"] == "gpt-4o-backup"
    record = pools.record(response)
    assert (record.model, record.account_id) == ("gpt-4o", second.pk)
    assert attempts(record) == [(first.pk, "upstream_error", 503)]


def test_request_fallbacks_are_used_when_the_primary_fails_and_checked_against_the_key(pools: Pools) -> None:
    primary, backup = pools.fake(), pools.fake()
    first = pools.account(primary, ("fb-main",))
    second = pools.account(backup, ("fb-backup",))
    key = pools.key(allowed_models=["fb-main", "fb-backup"])

    primary.set(status="502")
    response = pools.served(body("fb-main", fallbacks=["fb-backup"]), key=key)
    sent = backup.requests()[-1]["body"]
    assert sent["model"] == "fb-backup"
    assert "fallbacks" not in sent  # gateway-only
    record = pools.record(response)
    assert (record.model, record.account_id) == ("fb-backup", second.pk)
    assert attempts(record) == [(first.pk, "upstream_error", 502)]

    # A fallback the key may not use is refused before anything goes upstream.
    before = received(primary, backup)
    for fallbacks, param in ((["gpt-secret"], "fallbacks[0]"), (["fb-backup", "gpt-secret"], "fallbacks[1]")):
        refused = pools.post(body("fb-main", fallbacks=fallbacks), key=key)
        assert_error(refused, 403, "model_not_allowed", param=param)
    assert received(primary, backup) == before


# --- selection strategies -----------------------------------------------------------------------


def test_weighted_round_robin_matches_the_weights_exactly(pools: Pools) -> None:
    heavy, middle, light = pools.fake(), pools.fake(), pools.fake()
    for upstream, weight in ((heavy, 3), (middle, 2), (light, 1)):
        pools.account(upstream, weight=weight)
    for _ in range(6):
        pools.served(body())
    assert received(heavy, middle, light) == (3, 2, 1)
    for _ in range(6):
        pools.served(body())
    assert received(heavy, middle, light) == (6, 4, 2)


def test_fill_first_drains_one_account_then_spills_at_its_concurrency_cap(pools: Pools) -> None:
    second, first, third = pools.fake(), pools.fake(), pools.fake()
    pools.account(second, priority=1)
    pools.account(first, priority=0, max_concurrency=1)
    pools.account(third, priority=2)
    pools.strategy("fill_first")
    for _ in range(5):
        pools.served(body())
    assert received(first, second, third) == (5, 0, 0)

    with pools.held():  # the first account is at its cap of 1
        assert received(first, second, third) == (6, 0, 0)
        for _ in range(3):
            pools.served(body())
        assert received(first, second, third) == (6, 3, 0)
    # Once the held stream is gone, traffic returns to the first account.
    poll(lambda: pools.served(body()) and first.received > 6, what="back on the first account")
    assert third.received == 0


def test_concurrency_cap_of_the_only_account_answers_503_no_accounts(pools: Pools) -> None:
    upstream = pools.fake()
    pools.account(upstream, max_concurrency=1)
    with pools.held():
        response = pools.post(body())
        assert_error(response, 503, "no_accounts", type="server_error")
        assert response.headers["retry-after"] == "1"
        assert upstream.received == 1
    poll(lambda: pools.post(body()).status_code == 200, what="the slot is free again")


def test_least_in_flight_avoids_the_busy_account(pools: Pools) -> None:
    one, two = pools.fake(), pools.fake()
    pools.account(one)
    pools.account(two)
    pools.strategy("least_in_flight")
    with pools.held():
        busy, idle = (one, two) if one.received else (two, one)
        assert (busy.received, idle.received) == (1, 0)
        for _ in range(4):  # round robin would alternate; least in-flight keeps off the busy one
            pools.served(body())
        assert (busy.received, idle.received) == (1, 4)
        with pools.held():  # the next long request goes to the idle account too
            assert (busy.received, idle.received) == (1, 5)


def test_switching_the_strategy_applies_to_the_next_request_without_restart(pools: Pools) -> None:
    first, second = pools.fake(), pools.fake()
    pools.account(first, priority=0)
    pools.account(second, priority=1)
    for _ in range(4):
        pools.served(body())
    assert received(first, second) == (2, 2)  # weighted round robin, the default

    pools.strategy("fill_first")
    for _ in range(4):
        pools.served(body())
    assert received(first, second) == (6, 2)

    pools.strategy("weighted_round_robin")
    for _ in range(4):
        pools.served(body())
    assert received(first, second) == (8, 4)


# --- stickiness -----------------------------------------------------------------------------------


def test_same_prompt_cache_key_goes_to_the_same_account(pools: Pools) -> None:
    upstreams = [pools.fake() for _ in range(3)]
    for upstream in upstreams:
        pools.account(upstream)
    key = f"pck-same-{time.time_ns()}"
    for _ in range(6):
        pools.served(body(prompt_cache_key=key))
    assert sorted(received(*upstreams)) == [0, 0, 6]  # round robin alone would give 2 each
    # Interleaved with another key's requests, each key keeps its own account.
    served: dict[str, set[int]] = {key: set(), key + "-other": set()}
    for _ in range(3):
        for name in served:
            served[name].add(pools.record(pools.served(body(prompt_cache_key=name))).account_id)
    assert [len(ids) for ids in served.values()] == [1, 1]
    assert max(received(*upstreams)) >= 9


def test_a_failover_keeps_a_healthy_binding_an_unusable_one_moves(pools: Pools) -> None:
    one, two = pools.fake(), pools.fake()
    first = pools.account(one)
    second = pools.account(two)
    key = f"pck-keep-{time.time_ns()}"
    pools.served(body(prompt_cache_key=key))
    bound, other = (one, two) if one.received else (two, one)
    bound_account, other_account = (first, second) if bound is one else (second, first)

    # One 5xx: that request fails over, but the account stays healthy and keeps the binding.
    bound.set(status="500")
    record = pools.record(pools.served(body(prompt_cache_key=key)))
    assert (record.account_id, attempts(record)) == (other_account.pk, [(bound_account.pk, "upstream_error", 500)])
    bound.set()
    for _ in range(3):
        pools.served(body(prompt_cache_key=key))
    assert received(bound, other) == (5, 1)

    # Cooling down (429): the binding moves to the account that served...
    bound.set(status="429", retry_after="60")
    pools.served(body(prompt_cache_key=key))
    assert received(bound, other) == (6, 2)
    bound.set()
    wait_state(bound_account, State.COOLING)
    account_services.account_health_reset(account=bound_account)
    poll(lambda: pools.served(body()) and bound.received > 6, what="the reset account serves again")
    # ...and stays there while that account is healthy, even now that the first is usable again.
    before = received(bound, other)
    for _ in range(3):
        pools.served(body(prompt_cache_key=key))
    assert received(bound, other) == (before[0], before[1] + 3)


# --- failover before the first byte ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fault:
    knobs: dict[str, str]
    outcome: str  # of the failed attempt
    status: int
    state: State  # of the failing account afterwards
    reason: str = ""


FAULTS = {
    "connect": Fault({}, "upstream_error", 502, State.HEALTHY),
    "5xx": Fault({"status": "503"}, "upstream_error", 503, State.HEALTHY),
    "timeout": Fault({"hang": "1"}, "upstream_error", 502, State.HEALTHY),
    "429": Fault({"status": "429", "retry_after": "30"}, "rate_limited", 429, State.COOLING, "retry-after 30s"),
    "401": Fault({}, "upstream_error", 401, State.DISABLED, "upstream answered 401 (invalid_api_key)"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", list(FAULTS))
def test_failed_attempt_is_retried_on_another_account(
    pools: Pools, quick_gateway: str, kind: str, stream: bool
) -> None:
    fault = FAULTS[kind]
    failing, healthy = pools.fake(), pools.fake()
    if kind == "connect":
        target: KnobbedFake | str = f"http://127.0.0.1:{live.free_port()}/v1"  # nothing listens there
    else:
        target = failing
    if kind == "401":
        failing.configure(require_key="sk-rotated")
    failing.set(**fault.knobs)
    bad = pools.account(target, priority=0)
    good = pools.account(healthy, priority=1)
    pools.strategy("fill_first")

    url = quick_gateway if kind == "timeout" else None
    response = pools.served(body(stream=stream), url=url)
    if stream:
        types = [event["type"] for event in sse_events(response.content)]
        assert (types[0], types[-1], types.count("response.created")) == ("response.created", "response.completed", 1)
        assert "error" not in types
    assert healthy.received == 1
    if kind != "connect":
        assert failing.received == 1
    record = pools.record(response)
    assert (record.account_id, record.status_code, record.outcome) == (good.pk, 200, "completed")
    assert attempts(record) == [(bad.pk, fault.outcome, fault.status)]

    if fault.state is State.HEALTHY:
        # One failure counts toward the circuit breaker but changes no state.
        if REDIS:
            current = poll(lambda: health(bad), what="the shared record")
            assert current is not None
            assert (current.state, current.failures) == (State.HEALTHY, 1)
        assert transitions(bad) == []
        return
    wait_state(bad, fault.state, fault.reason)
    [(before, after, _)] = wait_transitions(bad, 1)
    assert (before, after) == ("healthy", fault.state.value)
    # While it is out, nothing more is sent to it, even once the upstream would answer.
    failing.set()
    for _ in range(3):
        pools.served(body(stream=stream), url=url)
    assert failing.received == 1


@pytest.mark.parametrize("knob", [{"fail_after": "2"}, {"cut_after": "1"}], ids=["failed", "cut"])
def test_stream_failing_right_after_its_prelude_is_retried_invisibly(pools: Pools, knob: dict[str, str]) -> None:
    failing, healthy = pools.fake(), pools.fake()
    failing.set(**knob)
    bad = pools.account(failing, priority=0)
    good = pools.account(healthy, priority=1)
    pools.strategy("fill_first")

    response = pools.served(body(stream=True))
    events = sse_events(response.content)
    types = [event["type"] for event in events]
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    assert types.count("response.created") == 1
    assert not {"error", "response.failed"} & set(types)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert events[0]["response"]["id"] == events[-1]["response"]["id"]
    assert received(failing, healthy) == (1, 1)
    record = pools.record(response)
    assert (record.account_id, record.outcome, record.response_id) == (
        good.pk,
        "completed",
        events[0]["response"]["id"],
    )
    assert [(a["account_id"], a["outcome"]) for a in record.attempts] == [(bad.pk, "upstream_error")]


# --- the health state machine -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knobs", "seconds", "reason"),
    [
        ({"retry_after": "30"}, (30, 30), "rate limited (429): retry-after 30s"),
        ({"error_code": "insufficient_quota"}, (3600, 3600), "quota exhausted (insufficient_quota)"),
        ({}, (0.8, 1.2), "rate limited (429): no hint, backoff"),  # 1 s +-20% jitter
    ],
    ids=["retry-after", "insufficient-quota", "burst-no-hint"],
)
def test_429_cools_the_account_until_its_deadline(
    pools: Pools, knobs: dict[str, str], seconds: tuple[float, float], reason: str
) -> None:
    limited, healthy = pools.fake(), pools.fake()
    limited.set(status="429", **knobs)
    bad = pools.account(limited, priority=0)
    pools.account(healthy, priority=1)
    pools.strategy("fill_first")

    started = time.time()
    pools.served(body())
    finished = time.time()
    current = wait_state(bad, State.COOLING, reason)
    assert current.until is not None
    assert started + seconds[0] - 0.01 <= current.until <= finished + seconds[1] + 0.01
    [(before, after, logged)] = wait_transitions(bad, 1)
    assert (before, after) == ("healthy", "cooling")
    assert logged.startswith(reason)


def test_three_5xx_open_the_circuit_and_the_in_process_prober_readmits(pools: Pools) -> None:
    flaky, healthy = pools.fake(), pools.fake()
    flaky.set(status="503")
    bad = pools.account(flaky, priority=0)
    good = pools.account(healthy, priority=1)
    pools.strategy("fill_first")

    for _ in range(3):
        pools.served(body())
    assert received(flaky, healthy) == (3, 3)
    # Three failures of one tenant's requests: a probe confirms (its own 503) and opens the circuit.
    opened = wait_state(bad, State.CIRCUIT_OPEN, "4 failures in")
    assert flaky.probes == 1
    assert opened.until is not None
    assert opened.reason.endswith("circuit open for 5s")
    pools.served(body())
    assert received(flaky, healthy) == (3, 4)  # open: not even tried

    # With only the open account left, the client is told when the next trial is due.
    account_services.upstream_account_set_enabled(account=good, enabled=False, reason="test")
    response = pools.post(body())
    assert_error(response, 503, "no_accounts", type="server_error")
    assert 1 <= int(response.headers["retry-after"]) <= math.ceil(opened.until - opened.since)
    assert flaky.received == 3

    # The upstream recovers: once the trial is due the gateway's own prober makes it and
    # re-admits the account, with no Celery running and no client request as the trial.
    flaky.set()
    wait_state(bad, State.HEALTHY, "trial request succeeded")
    assert (flaky.received, flaky.probes) == (3, 2)
    pools.served(body())
    assert flaky.received == 4
    assert [(before, after) for before, after, _ in wait_transitions(bad, 2)] == [
        ("healthy", "circuit_open"),
        ("circuit_open", "healthy"),
    ]


def test_one_tenants_401_is_confirmed_by_a_probe_before_the_account_is_disabled(pools: Pools) -> None:
    upstream = pools.fake()
    account = pools.account(upstream)
    other = pools.key(actor=pools.live.outsider)
    # One tenant's request gets a 401 (a per-request knob): evidence, so the gateway probes.
    response = pools.post(body(metadata={"fake_status": "401"}))
    assert response.status_code == 502
    poll(lambda: upstream.probes == 1, what="the confirming probe")
    assert health(account) is None or health(account).state is State.HEALTHY  # type: ignore[union-attr]
    pools.served(body(), key=other)  # every tenant is still served by the account
    assert upstream.received == 2


def test_one_tenants_server_errors_do_not_open_the_circuit_for_the_others(pools: Pools) -> None:
    upstream = pools.fake()
    account = pools.account(upstream)
    other = pools.key(actor=pools.live.outsider)
    for _ in range(3):
        assert pools.post(body(metadata={"fake_status": "500"})).status_code == 502
    poll(lambda: upstream.probes == 1, what="the confirming probe")
    pools.served(body(), key=other)
    assert upstream.received == 4
    current = health(account)
    assert current is None or (current.state is State.HEALTHY and current.failures == 0)


def test_every_account_cooling_answers_429_with_the_earliest_deadline(pools: Pools) -> None:
    later, sooner = pools.fake(), pools.fake()
    later.set(status="429", retry_after="40")
    sooner.set(status="429", retry_after="20")
    first = pools.account(later, priority=0)
    second = pools.account(sooner, priority=1)
    pools.strategy("fill_first")

    started = time.monotonic()
    response = pools.post(body())
    elapsed = time.monotonic() - started
    assert_error(response, 429, "usage_limit_reached", type="rate_limit_error")
    retry = int(response.headers["retry-after"])
    assert 20 - elapsed - 1 <= retry <= 20
    record = pools.record(response)
    assert (record.status_code, record.outcome) == (429, "rate_limited")
    assert attempts(record) == [(first.pk, "rate_limited", 429), (second.pk, "rate_limited", 429)]

    # While both cool down nothing goes upstream, and the answer keeps the earliest deadline.
    again = pools.post(body(stream=True))
    assert_error(again, 429, "usage_limit_reached", type="rate_limit_error")
    assert int(again.headers["retry-after"]) <= retry
    assert received(later, sooner) == (1, 1)
    assert wait_state(first, State.COOLING).until is not None
    assert wait_state(second, State.COOLING).until is not None


def test_no_usable_account_answers_503_no_accounts(pools: Pools) -> None:
    one, two = pools.fake(require_key="sk-rotated"), pools.fake(require_key="sk-rotated")
    first = pools.account(one)
    second = pools.account(two)
    # Both credentials are refused: that request fails, and both accounts are disabled.
    assert_error(pools.post(body()), 502, "upstream_error", type="server_error")
    wait_state(first, State.DISABLED, "401")
    wait_state(second, State.DISABLED, "401")
    for stream in (False, True):
        assert_error(pools.post(body(stream=stream)), 503, "no_accounts", type="server_error")
    assert received(one, two) == (1, 1)
    # Disabled by an operator: the same answer, decided before any account is picked.
    for account in (first, second):
        account_services.upstream_account_set_enabled(account=account, enabled=False, reason="test")
    assert_error(pools.post(body()), 503, "no_accounts", type="server_error")
    assert received(one, two) == (1, 1)


def test_failed_attempts_are_recorded_with_their_usage_and_billed(pools: Pools) -> None:
    from gateway.devtools.fake_upstream.wire import OK_HEADERS, SSE_TYPE, chunk, head, sse_frame
    from tenancy import pricing
    from tenancy.models import PriceVersion
    from tenancy.services.prices import price_set

    failing, healthy = pools.fake(), pools.fake()
    usage = {
        "input_tokens": 20,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 23,
    }

    def failed_with_usage(_request: Any) -> list[bytes]:
        # An upstream that fails after its prelude but reports what it consumed.
        response: dict[str, Any] = {
            "id": "resp_failed",
            "object": "response",
            "status": "in_progress",
            "output": [],
            "usage": None,
        }
        failed = {**response, "status": "failed", "usage": usage, "error": {"code": "server_error", "message": "x"}}
        events = [
            {"type": "response.created", "sequence_number": 0, "response": response},
            {"type": "response.in_progress", "sequence_number": 1, "response": response},
            {"type": "response.failed", "sequence_number": 2, "response": failed},
        ]
        return [head(200, SSE_TYPE, None, OK_HEADERS), *(chunk(sse_frame(e)) for e in events), b"0\r\n\r\n"]

    failing.script = failed_with_usage
    bad = pools.account(failing, priority=0)
    good = pools.account(healthy, priority=1)
    pools.strategy("fill_first")
    price = price_set(model=MODEL, input="1", cached_input="0.5", cache_write="1.25", output="2")

    record = pools.record(pools.served(body(stream=True)))
    assert record.account_id == good.pk
    assert record.attempts == [
        {
            "account_id": bad.pk,
            "outcome": "upstream_error",
            "status": 200,
            "input_tokens": 20,
            "cached_tokens": 0,
            "cache_write_tokens": None,
            "output_tokens": 3,
            "reasoning_tokens": 0,
            "total_tokens": 23,
        }
    ]
    row = pricing.Price.from_row(PriceVersion.objects.values().get(pk=price.pk))
    final = {name: getattr(record, name) for name in record.attempts[0] if name.endswith("_tokens")}
    final_cost, failed_cost = pricing.cost_usd(final, row), pricing.cost_usd(record.attempts[0], row)
    assert final_cost is not None
    assert failed_cost is not None
    assert failed_cost > 0
    assert record.cost == final_cost + failed_cost  # the failed attempt is billed too

    # A failed JSON attempt has the same shape, its usage unknown.
    failing.script = None
    failing.set(status="500")
    record = pools.record(pools.served(body()))
    assert record.attempts == [
        {
            "account_id": bad.pk,
            "outcome": "upstream_error",
            "status": 500,
            **dict.fromkeys(("input_tokens", "cached_tokens", "cache_write_tokens"), None),
            **dict.fromkeys(("output_tokens", "reasoning_tokens", "total_tokens"), None),
        }
    ]


def test_probe_readmits_an_account_once_the_upstream_accepts_its_key_again(pools: Pools) -> None:
    rotated, healthy = pools.fake(require_key="sk-rotated"), pools.fake()
    bad = pools.account(rotated, priority=0)
    pools.account(healthy, priority=1)
    pools.strategy("fill_first")

    pools.served(body())
    # The request's 401 is confirmed by a probe (its own 401): disabled.
    wait_state(bad, State.DISABLED, "upstream answered 401 (invalid_api_key): credential rejected")
    assert rotated.requests()[-1]["headers"]["authorization"] == "Bearer sk-upstream-secret"

    rotated.configure(require_key="sk-upstream-secret")  # the key is valid again
    # The gateway's own prober (no Celery) re-admits it within seconds.
    wait_state(bad, State.HEALTHY, "probe succeeded (HTTP 200)")
    # The gateway uses it again (fill-first: it is the first account).
    before = rotated.received
    poll(lambda: pools.served(body()) and rotated.received > before, what="traffic back on the account")
    assert [(a, b) for a, b, _ in wait_transitions(bad, 2)] == [("healthy", "disabled"), ("disabled", "healthy")]


# --- two gateway processes sharing PostgreSQL and Redis -------------------------------------------

shared_only = pytest.mark.skipif(not SHARED, reason="needs DATABASE_URL=postgres://... and REDIS_URL")


@pytest.fixture(scope="module")
def replicas(live_env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """Two more gateway processes: the same database, the same Redis."""
    if not SHARED:
        pytest.skip("needs DATABASE_URL=postgres://... and REDIS_URL")
    with contextlib.ExitStack() as stack:
        urls = []
        for name in ("a", "b"):
            port = live.free_port()
            process = live.gateway(port, live_env, DATA_DIR / f"gateway-replica-{name}.log")
            urls.append(stack.enter_context(live.running(process)).url)
        yield urls[0], urls[1]


def _shared_fault(
    pools: Pools, replicas: tuple[str, str], inject: Callable[[KnobbedFake], None], state: State, requests: int
) -> None:
    """Make the first account fail through replica A, heal its upstream, then check replica B
    sends it nothing (it would be B's first choice if B did not know)."""
    gateway_a, gateway_b = replicas
    failing, healthy = pools.fake(), pools.fake()
    bad = pools.account(failing, priority=0)
    pools.account(healthy, priority=1)
    pools.strategy("fill_first")
    pools.served(body(), url=gateway_b)  # B is warm and uses the first account
    assert received(failing, healthy) == (1, 0)

    inject(failing)
    for _ in range(requests):
        pools.served(body(), url=gateway_a)
    assert received(failing, healthy) == (1 + requests, requests)
    wait_state(bad, state)  # the shared record; B got it by pub/sub in the same instant
    failing.set()
    failing.configure(require_key=None)
    for stream in (False, True, False):
        pools.served(body(stream=stream), url=gateway_b)
    assert received(failing, healthy) == (1 + requests, requests + 3)


@shared_only
def test_a_429_seen_by_one_gateway_is_honoured_by_the_other(pools: Pools, replicas: tuple[str, str]) -> None:
    _shared_fault(pools, replicas, lambda fake: fake.set(status="429", retry_after="60"), State.COOLING, 1)


@shared_only
def test_a_circuit_opened_by_one_gateway_is_honoured_by_the_other(pools: Pools, replicas: tuple[str, str]) -> None:
    _shared_fault(pools, replicas, lambda fake: fake.set(status="502"), State.CIRCUIT_OPEN, 3)


@shared_only
def test_a_401_disable_by_one_gateway_is_honoured_by_the_other(pools: Pools, replicas: tuple[str, str]) -> None:
    _shared_fault(pools, replicas, lambda fake: fake.configure(require_key="sk-rotated"), State.DISABLED, 1)


@shared_only
def test_a_binding_made_by_one_gateway_is_followed_by_the_other(pools: Pools, replicas: tuple[str, str]) -> None:
    from accounts.health import store as health_store
    from accounts.routing.stickiness import DEFAULT_PREFIX, sticky_key

    gateway_a, gateway_b = replicas
    upstreams = [pools.fake() for _ in range(3)]
    accounts = [pools.account(upstream) for upstream in upstreams]
    # On A, one request without a key takes the first account; the keyed one then binds the second.
    pools.served(body(), url=gateway_a)
    key = f"pck-shared-{time.time_ns()}"
    pools.served(body(prompt_cache_key=key), url=gateway_a)
    assert received(*upstreams) == (1, 1, 0)
    client = health_store.sync_client()
    assert client is not None
    name = f"{DEFAULT_PREFIX}:{sticky_key(pools.live.owner.tenant.id, accounts[1].pool_id, key)}"
    assert poll(lambda: client.get(name), what="the binding in Redis") == str(accounts[1].pk).encode()
    # B, fresh, would start round robin on the first account; the binding sends it to the second.
    for _ in range(4):
        pools.served(body(prompt_cache_key=key), url=gateway_b)
    assert received(*upstreams) == (1, 5, 0)
