"""Operator commands and services of pools, routes and account health, and the prober.

Runs in embedded mode, and against Redis when ``REDIS_URL`` is set (under a key
prefix of its own, removed afterwards): the services pick the backend from settings.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import StringIO
from typing import Any

import httpx
import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError

from accounts.health import store as health_store
from accounts.health.machine import (
    AuthFailure,
    Event,
    Health,
    HealthMachine,
    HealthPolicy,
    ServerError,
    State,
    Transition,
)
from accounts.health.probing import ProbeResult, accounts_probe_run, probe_body, probe_rows, probe_verdict
from accounts.models import AccountTransition, Pool, UpstreamAccount
from accounts.selectors import account_health_states, accounts_for_snapshot
from accounts.services import (
    account_health_reset,
    account_transitions_write,
    pool_get_or_create,
    pool_set_strategy,
    upstream_account_create,
    upstream_account_set_enabled,
    upstream_account_update,
)
from accounts.upstream.client import UpstreamConnectError, UpstreamReply

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


@pytest.fixture(autouse=True)
def health_prefix(settings: Any) -> Iterator[None]:
    """A Redis key prefix of this test's own (no-op in embedded mode)."""
    settings.GATEWAY_HEALTH_REDIS_PREFIX = f"gwtest:{uuid.uuid4().hex}:health"
    yield
    client = health_store.sync_client()
    if client is not None:
        keys = list(client.scan_iter(match=settings.GATEWAY_HEALTH_REDIS_PREFIX + "*"))
        if keys:
            client.delete(*keys)


@pytest.fixture
def account() -> UpstreamAccount:
    pool = pool_get_or_create(name="main")
    return upstream_account_create(
        pool=pool, base_url="http://127.0.0.1:9/v1", api_key="sk-upstream-secret", models=["gpt-a"]
    )


def make_unhealthy(account_id: int, *events: Event) -> None:
    """Put an account in a state as a gateway would: shared record (Redis) and transition log."""
    client = health_store.sync_client()
    if client is not None:
        _, transitions = health_store.apply_sync(client, account_id, list(events), time.time())
    else:
        machine = HealthMachine(HealthPolicy.from_settings())
        current = account_health_states([account_id]).get(account_id) or Health(account_id)
        transitions = []
        for event in events:
            current, transition = machine.apply(current, event, time.time())
            if transition is not None:
                transitions.append(transition)
    account_transitions_write(transitions)


# --- pool_strategy --------------------------------------------------------------------------


def test_pool_strategy_command(account: UpstreamAccount) -> None:
    assert "main uses weighted_round_robin" in run("pool_strategy", "main")
    assert "main uses fill_first" in run("pool_strategy", "main", "fill_first")
    assert Pool.objects.get(name="main").strategy == "fill_first"
    assert accounts_for_snapshot()[0]["strategy"] == "fill_first"
    with pytest.raises(CommandError, match="not a strategy"):
        run("pool_strategy", "main", "random")
    with pytest.raises(CommandError, match="unknown pool"):
        run("pool_strategy", "nope", "fill_first")


def test_pool_set_strategy_validates(account: UpstreamAccount) -> None:
    pool = Pool.objects.get(name="main")
    with pytest.raises(ValidationError):
        pool_set_strategy(pool=pool, strategy="round_robin")
    assert pool_set_strategy(pool=pool, strategy=" least_in_flight ").strategy == "least_in_flight"


# --- route_set ------------------------------------------------------------------------------


def test_route_set_command(account: UpstreamAccount) -> None:
    pool_get_or_create(name="backup")
    out = run("route_set", "smart", "--target", "main:gpt-a", "--target", "backup:ft:gpt-4o:org:abc")
    assert out.strip() == "smart -> main:gpt-a, backup:ft:gpt-4o:org:abc"
    assert run("route_set", "smart").strip() == "smart -> main:gpt-a, backup:ft:gpt-4o:org:abc"
    assert "has no route" in run("route_set", "other")
    assert "deleted" in run("route_set", "smart", "--delete")
    with pytest.raises(CommandError, match="has no route"):
        run("route_set", "smart", "--delete")
    with pytest.raises(CommandError, match="POOL:UPSTREAM_MODEL"):
        run("route_set", "smart", "--target", "main")
    with pytest.raises(CommandError, match="unknown pool"):
        run("route_set", "smart", "--target", "ghost:gpt-a")
    with pytest.raises(CommandError, match="not both"):
        run("route_set", "smart", "--target", "main:gpt-a", "--delete")


# --- upstream_update ------------------------------------------------------------------------


def test_upstream_update_command(account: UpstreamAccount) -> None:
    out = run(
        "upstream_update", str(account.pk), "--weight", "3", "--max-concurrency", "8", "--priority", "-2",
        "--models", "gpt-a, gpt-b",
    )  # fmt: skip
    assert "weight 3, max concurrency 8, priority -2, models gpt-a, gpt-b, enabled" in out
    assert "sk-upstream-secret" not in out
    account.refresh_from_db()
    assert (account.weight, account.max_concurrency, account.priority, account.models) == (3, 8, -2, ["gpt-a", "gpt-b"])
    row = accounts_for_snapshot()[0]
    assert (row["max_concurrency"], row["priority"], row["weight"]) == (8, -2, 3)
    assert "max concurrency unlimited" in run("upstream_update", str(account.pk), "--max-concurrency", "unlimited")
    account.refresh_from_db()
    assert account.max_concurrency is None


def test_upstream_update_disable_and_enable_are_recorded(account: UpstreamAccount) -> None:
    out = run("upstream_update", str(account.pk), "--disable", "--reason", "key rotated")
    assert "disabled (key rotated)" in out
    account.refresh_from_db()
    assert not account.enabled
    assert account.disabled_reason == "key rotated"
    assert not accounts_for_snapshot()[0]["enabled"]
    out = run("upstream_update", str(account.pk), "--enable")
    assert out.rstrip().endswith("enabled.")
    account.refresh_from_db()
    assert account.enabled
    assert account.disabled_reason == ""
    assert account.health_reset_at is not None
    log = list(AccountTransition.objects.order_by("at", "pk").values_list("from_state", "to_state", "reason"))
    assert log == [
        ("healthy", "disabled", "disabled by operator: key rotated"),
        ("disabled", "healthy", "enabled by operator"),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["999999"], "no upstream account"),
        (["x"], "whole number"),
        (["{id}", "--weight", "0"], "at least 1"),
        (["{id}", "--weight", "lots"], "whole number"),
        (["{id}", "--max-concurrency", "-3"], "at least 1"),
        (["{id}", "--reason", "why"], "goes with --disable"),
        (["{id}", "--models", " , "], "at least one model"),
    ],
)
def test_upstream_update_errors(account: UpstreamAccount, args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run("upstream_update", *[a.format(id=account.pk) for a in args])


def test_upstream_account_update_service(account: UpstreamAccount) -> None:
    same = upstream_account_update(account=account)
    assert same.weight == 1
    upstream_account_update(account=account, max_concurrency=4, priority=1)
    account.refresh_from_db()
    assert (account.max_concurrency, account.priority) == (4, 1)
    upstream_account_update(account=account, max_concurrency=None)
    account.refresh_from_db()
    assert account.max_concurrency is None
    for bad in ({"weight": True}, {"max_concurrency": 0}, {"priority": 2**40}, {"models": "gpt-a"}):
        with pytest.raises(ValidationError):
            upstream_account_update(account=account, **bad)


def test_upstream_account_create_takes_cap_and_priority() -> None:
    pool = pool_get_or_create(name="p")
    created = upstream_account_create(
        pool=pool, base_url="http://127.0.0.1:9/v1", models=["m"], max_concurrency=2, priority=3
    )
    assert (created.max_concurrency, created.priority) == (2, 3)
    with pytest.raises(ValidationError):
        upstream_account_create(pool=pool, base_url="http://127.0.0.1:9/v1", models=["m"], max_concurrency=0)


def test_snapshot_rows_keep_their_keys(account: UpstreamAccount) -> None:
    row = accounts_for_snapshot()[0]
    assert {
        "id", "pool_id", "pool_name", "name", "provider", "base_url", "models", "weight", "enabled",
        "strip_fields", "credential", "created_at", "strategy", "max_concurrency", "priority", "health_reset_at",
    } <= set(row)  # fmt: skip
    assert row["credential"] == "sk-upstream-secret"
    assert row["health_reset_at"] is None


# --- account_health -------------------------------------------------------------------------


def test_account_health_shows_state_and_transitions(account: UpstreamAccount) -> None:
    assert f"[main] account {account.pk}: healthy" in run("account_health")
    make_unhealthy(account.pk, AuthFailure(401, "invalid_api_key"))
    out = run("account_health", "main")
    assert f"account {account.pk}: disabled (upstream answered 401 (invalid_api_key): credential rejected)" in out
    assert "healthy -> disabled: upstream answered 401" in out
    with pytest.raises(CommandError, match="unknown pool"):
        run("account_health", "nope")


def test_account_health_reset_readmits(account: UpstreamAccount) -> None:
    make_unhealthy(account.pk, AuthFailure(401))
    assert account_health_states([account.pk])[account.pk].state is State.DISABLED
    out = run("account_health", "--reset", str(account.pk))
    assert f"Account {account.pk} re-admitted (was disabled)" in out
    account.refresh_from_db()
    assert account.health_reset_at is not None
    states = account_health_states([account.pk])
    assert states[account.pk].state is State.HEALTHY
    last = AccountTransition.objects.order_by("-at", "-pk").first()
    assert last is not None
    assert (last.from_state, last.to_state, last.reason) == ("disabled", "healthy", "reset by operator")
    assert "was not unhealthy" in run("account_health", "--reset", str(account.pk))
    with pytest.raises(CommandError, match="no upstream account"):
        run("account_health", "--reset", "999999")


def test_operator_disabled_accounts_show_as_such(account: UpstreamAccount) -> None:
    upstream_account_set_enabled(account=account, enabled=False, reason="billing")
    assert "disabled by operator: billing" in run("account_health")


def test_transition_writes_skip_deleted_accounts(account: UpstreamAccount) -> None:
    rows = [
        Transition(account.pk, State.HEALTHY, State.COOLING, "x" * 600, 1_700_000_000.0, 1_700_000_001.0),
        Transition(999_999, State.HEALTHY, State.COOLING, "gone", 1_700_000_000.0),
    ]
    assert account_transitions_write(rows) == 1
    assert len(AccountTransition.objects.get().reason) == 500


def test_health_reset_of_a_healthy_account_records_nothing(account: UpstreamAccount) -> None:
    assert account_health_reset(account=account) is None
    assert not AccountTransition.objects.exists()


# --- probing --------------------------------------------------------------------------------


@dataclass
class StubClient:
    """Answers probes with a fixed status (or raises), recording what it was sent."""

    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=dict)
    error: Exception | None = None
    sent: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> UpstreamReply:
        self.sent.append((url, headers, body))
        if self.error is not None:
            raise self.error
        return UpstreamReply(self.status, httpx.Headers(self.headers), self.body)

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize(
    ("before", "event", "verdict"),
    [
        (State.DISABLED, None, "readmitted"),
        (State.DISABLED, AuthFailure(401), "unchanged"),
        (State.DISABLED, ServerError("503"), "unchanged"),
        (State.CIRCUIT_OPEN, None, "readmitted"),
        (State.CIRCUIT_OPEN, ServerError("timeout"), "reopened"),
        (State.CIRCUIT_OPEN, AuthFailure(403), "disabled"),
    ],
)
def test_probe_verdicts(before: State, event: Event | None, verdict: str) -> None:
    assert probe_verdict(before, ProbeResult(1, 200, event, ""))[0] == verdict


def test_probe_readmits_an_account_that_answers(account: UpstreamAccount) -> None:
    make_unhealthy(account.pk, AuthFailure(401))
    client = StubClient(status=200)
    outcomes = accounts_probe_run(client=client)
    assert [(o.account_id, o.before, o.verdict) for o in outcomes] == [(account.pk, State.DISABLED, "readmitted")]
    url, headers, body = client.sent[0]
    assert url == "http://127.0.0.1:9/v1/responses"
    assert headers["authorization"] == "Bearer sk-upstream-secret"
    assert body == probe_body("gpt-a")
    assert account_health_states([account.pk])[account.pk].state is State.HEALTHY
    assert "probe succeeded (HTTP 200)" in run("account_health")
    assert accounts_probe_run(client=StubClient()) == []  # nothing left to probe


def test_probe_leaves_a_rejected_key_disabled(account: UpstreamAccount) -> None:
    make_unhealthy(account.pk, AuthFailure(401))
    outcomes = accounts_probe_run(client=StubClient(status=401, body=b'{"error":{"code":"invalid_api_key"}}'))
    assert [o.verdict for o in outcomes] == ["unchanged"]
    assert account_health_states([account.pk])[account.pk].state is State.DISABLED


def test_probe_skips_operator_disabled_and_not_yet_due(account: UpstreamAccount) -> None:
    make_unhealthy(account.pk, *[ServerError("502")] * 3)  # circuit open, trial due in 5 s
    assert accounts_probe_run(client=StubClient()) == []
    upstream_account_set_enabled(account=account, enabled=False)
    assert accounts_probe_run(client=StubClient()) == []


def test_probe_of_an_open_circuit(account: UpstreamAccount, settings: Any) -> None:
    settings.GATEWAY_HEALTH_OPEN_BASE = 0.01
    make_unhealthy(account.pk, *[ServerError("502")] * 3)
    time.sleep(0.02)
    outcomes = accounts_probe_run(client=StubClient(error=UpstreamConnectError("could not connect")))
    assert [(o.before, o.verdict) for o in outcomes] == [(State.CIRCUIT_OPEN, "reopened")]
    if health_store.sync_client() is not None:  # shared record: reopened for longer, logged
        health = account_health_states([account.pk])[account.pk]
        assert health.state is State.CIRCUIT_OPEN
        assert health.opens == 2
        assert AccountTransition.objects.filter(reason__startswith="trial request failed").exists()
    time.sleep(0.05)
    outcomes = accounts_probe_run(client=StubClient(status=200))
    assert [o.verdict for o in outcomes] == ["readmitted"]
    assert account_health_states([account.pk])[account.pk].state is State.HEALTHY


def test_probe_tasks_count_verdicts(account: UpstreamAccount) -> None:
    """The tasks probe through the real client: the account's address (port 9 of the loopback)
    refuses connections, so a disabled account stays disabled. Re-admission through the tasks:
    test_probe_against_the_fake_upstream."""
    from accounts import tasks

    assert tasks.account_probe(account.pk) == "not_a_candidate"  # healthy
    make_unhealthy(account.pk, AuthFailure(403))
    assert tasks.account_probe(account.pk) == "unchanged"
    assert tasks.accounts_probe() == {"unchanged": 1}
    assert account_health_states([account.pk])[account.pk].state is State.DISABLED


@pytest.mark.live
def test_probe_against_the_fake_upstream(transactional_db: None, fake_upstream: Any) -> None:
    """The real client and wire, through the Celery tasks: a revoked key stays disabled, a valid
    one is re-admitted."""
    from accounts import tasks

    pool = pool_get_or_create(name="live")
    account = upstream_account_create(
        pool=pool, base_url=fake_upstream.base_url, api_key="sk-live-probe", models=["gpt-live"]
    )
    make_unhealthy(account.pk, AuthFailure(401))
    control = fake_upstream.base_url.removesuffix("/v1") + "/_fake/config"
    before = httpx.get(control).json()
    httpx.post(control, json={"require_key": "sk-something-else"})
    try:
        assert tasks.accounts_probe() == {"unchanged": 1}
    finally:
        httpx.post(control, json={"require_key": before["require_key"]})
    assert tasks.account_probe(account.pk) == "readmitted"
    assert tasks.account_probe(account.pk) == "not_a_candidate"
    sent = fake_upstream.last_request()
    assert sent["path"].endswith("/responses")
    assert sent["body"]["max_output_tokens"] == 16
    assert sent["body"]["store"] is False
    assert sent["headers"]["authorization"] == "Bearer sk-live-probe"


def test_probe_rows_run_concurrently_and_survive_errors() -> None:
    rows = [{"id": i, "base_url": "http://x/v1", "models": ["m"], "credential": None} for i in range(1, 4)]
    results = asyncio.run(probe_rows(rows, StubClient(error=UpstreamConnectError("down"))))
    assert [r.event for r in results] == [ServerError("connect")] * 3
    assert all(r.status is None for r in results)
