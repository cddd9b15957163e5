"""Operator commands and services of pools, routes and account health, and the prober.

Runs in embedded mode, and against Redis when ``REDIS_URL`` is set (under a key
prefix of its own, removed afterwards): the services pick the backend from settings.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from io import StringIO
from typing import Any

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
    State,
    Transition,
)
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
