"""Model routes: pure resolution (accounts/routing/routes.py) and the services and selectors behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from accounts.models import ModelRoute, ModelRouteTarget
from accounts.routing.routes import (
    FallbackNotAllowed,
    accounts_by_pool_model,
    attempt_plan,
    fallback_models,
    route_table,
    route_targets,
    routes_from_rows,
)


@dataclass(frozen=True)
class Acc:
    account_id: int
    pool_id: int
    models: frozenset[str]


ACCOUNTS = [
    Acc(1, 10, frozenset({"gpt-4o", "gpt-4o-2024-08-06"})),
    Acc(2, 10, frozenset({"gpt-4o-2024-08-06"})),
    Acc(3, 20, frozenset({"gpt-4o", "gpt-4o-mini"})),
    Acc(4, 30, frozenset({"claude-compatible"})),
]
BY_POOL_MODEL = accounts_by_pool_model(ACCOUNTS)


def test_accounts_are_grouped_by_pool_and_model_in_order() -> None:
    assert [a.account_id for a in BY_POOL_MODEL[(10, "gpt-4o-2024-08-06")]] == [1, 2]
    assert [a.account_id for a in BY_POOL_MODEL[(20, "gpt-4o")]] == [3]
    assert (30, "gpt-4o") not in BY_POOL_MODEL


def test_unrouted_model_is_served_by_every_pool_listing_it_in_pool_order() -> None:
    assert route_targets("gpt-4o", {}, BY_POOL_MODEL) == [(10, "gpt-4o"), (20, "gpt-4o")]
    assert route_targets("gpt-4o-mini", {}, BY_POOL_MODEL) == [(20, "gpt-4o-mini")]
    assert route_targets("unknown", {}, BY_POOL_MODEL) == []


def test_route_aliases_and_orders_fallback_pools() -> None:
    routes = {"gpt-4o": ((20, "gpt-4o"), (10, "gpt-4o-2024-08-06"))}
    assert route_targets("gpt-4o", routes, BY_POOL_MODEL) == [(20, "gpt-4o"), (10, "gpt-4o-2024-08-06")]
    alias = {"smart": ((10, "gpt-4o-2024-08-06"),)}
    assert route_targets("smart", alias, BY_POOL_MODEL) == [(10, "gpt-4o-2024-08-06")]


def test_route_targets_without_accounts_are_dropped_and_a_route_shadows_the_name() -> None:
    routes = {"gpt-4o": ((30, "gpt-4o"), (20, "gpt-4o")), "dead": ((30, "nothing"),)}
    assert route_targets("gpt-4o", routes, BY_POOL_MODEL) == [(20, "gpt-4o")]  # pool 10 is not a target
    assert route_targets("dead", routes, BY_POOL_MODEL) == []


def test_route_table_precomputes_every_servable_model() -> None:
    routes = {"smart": ((10, "gpt-4o-2024-08-06"), (20, "gpt-4o")), "dead": ((30, "nothing"),)}
    table = route_table(routes, BY_POOL_MODEL)
    assert table["smart"] == ((10, "gpt-4o-2024-08-06"), (20, "gpt-4o"))
    assert table["gpt-4o"] == ((10, "gpt-4o"), (20, "gpt-4o"))
    assert table["claude-compatible"] == ((30, "claude-compatible"),)
    assert "dead" not in table
    assert set(table) == {"smart", "gpt-4o", "gpt-4o-2024-08-06", "gpt-4o-mini", "claude-compatible"}


def test_routes_from_rows() -> None:
    rows = [{"model": "m", "targets": [{"pool_id": 1, "pool_name": "a", "upstream_model": "u"}]}]
    assert routes_from_rows(rows) == {"m": ((1, "u"),)}


def test_fallbacks_are_checked_against_the_key() -> None:
    assert fallback_models("a", ["b", "a", "c", "b"], None) == ["b", "c"]
    assert fallback_models("a", None, {"a"}) == []
    assert fallback_models("a", ["b"], {"a", "b"}) == ["b"]
    with pytest.raises(FallbackNotAllowed) as caught:
        fallback_models("a", ["b", "secret", "c"], {"a", "b", "c"})
    assert caught.value.index == 1
    assert caught.value.model == "secret"
    assert caught.value.param == "fallbacks[1]"
    assert "secret" in str(caught.value)


def test_attempt_plan_chains_fallback_models_without_repeating_targets() -> None:
    table = route_table({"smart": ((10, "gpt-4o-2024-08-06"),)}, BY_POOL_MODEL)
    plan = attempt_plan("gpt-4o", ["smart", "nothing-serves-this", "gpt-4o-mini"], table)
    assert plan == [
        ("gpt-4o", 10, "gpt-4o"),
        ("gpt-4o", 20, "gpt-4o"),
        ("smart", 10, "gpt-4o-2024-08-06"),
        ("gpt-4o-mini", 20, "gpt-4o-mini"),
    ]
    assert attempt_plan("gpt-4o", ["gpt-4o"], table) == plan[:2]
    assert attempt_plan("nothing", [], table) == []


# --- services and selectors -----------------------------------------------------------------


@pytest.fixture
def pools(db: None) -> dict[str, Any]:
    from accounts.services import pool_get_or_create, upstream_account_create

    main = pool_get_or_create(name="main")
    backup = pool_get_or_create(name="backup")
    upstream_account_create(pool=main, base_url="http://127.0.0.1:9/v1", models=["gpt-4o-2024-08-06"])
    upstream_account_create(pool=backup, base_url="http://127.0.0.1:9/v1", models=["gpt-4o"])
    return {"main": main, "backup": backup}


def test_model_route_set_replaces_targets_in_order(pools: dict[str, Any]) -> None:
    from accounts.selectors import routes_for_snapshot
    from accounts.services import model_route_set

    model_route_set(model=" gpt-4o ", targets=[("main", "gpt-4o-2024-08-06"), ("backup", "gpt-4o")])
    route = ModelRoute.objects.get()
    assert route.model == "gpt-4o"
    assert [(t.pool.name, t.upstream_model, t.position) for t in route.targets.order_by("position")] == [
        ("main", "gpt-4o-2024-08-06", 0),
        ("backup", "gpt-4o", 1),
    ]
    model_route_set(model="gpt-4o", targets=[("backup", "gpt-4o")])
    assert ModelRoute.objects.count() == 1
    assert ModelRouteTarget.objects.count() == 1
    assert routes_for_snapshot() == [
        {
            "model": "gpt-4o",
            "targets": [{"pool_id": pools["backup"].pk, "pool_name": "backup", "upstream_model": "gpt-4o"}],
        }
    ]


@pytest.mark.parametrize(
    ("model", "targets", "message"),
    [
        ("", [("main", "x")], "model name"),
        ("m", [], "at least one target"),
        ("m", [("nope", "x")], "unknown pool"),
        ("m", [("main", "")], "upstream model"),
        ("m", [("main", "x"), ("main", "x")], "twice"),
        ("m", [("main", "x", "extra")], "pair"),
        ("x" * 201, [("main", "x")], "too long"),
    ],
)
def test_model_route_set_validates(pools: dict[str, Any], model: str, targets: Any, message: str) -> None:
    from accounts.services import model_route_set

    with pytest.raises(ValidationError, match=message):
        model_route_set(model=model, targets=targets)
    assert not ModelRoute.objects.exists()


def test_model_route_delete(pools: dict[str, Any]) -> None:
    from accounts.services import model_route_delete, model_route_set

    model_route_set(model="gpt-4o", targets=[("backup", "gpt-4o")])
    assert model_route_delete(model="gpt-4o")
    assert not model_route_delete(model="gpt-4o")
    assert not ModelRouteTarget.objects.exists()


def test_deleting_a_pool_leaves_its_routes_without_those_targets(pools: dict[str, Any]) -> None:
    from accounts.selectors import routes_for_snapshot
    from accounts.services import model_route_set

    model_route_set(model="gpt-4o", targets=[("backup", "gpt-4o")])
    pools["backup"].delete()
    assert routes_for_snapshot() == [{"model": "gpt-4o", "targets": []}]
    assert routes_from_rows(routes_for_snapshot()) == {"gpt-4o": ()}


def test_route_changes_are_announced(pools: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from django.db import transaction

    from accounts.services import model_route_delete, model_route_set
    from gateway.config import notify

    calls: list[int] = []
    monkeypatch.setattr(notify, "config_changed", lambda: calls.append(1))
    monkeypatch.setattr(transaction, "on_commit", lambda func, using=None, robust=False: func())
    model_route_set(model="gpt-4o", targets=[("backup", "gpt-4o")])
    assert calls
    calls.clear()
    model_route_delete(model="gpt-4o")
    assert calls
