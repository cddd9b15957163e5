"""Which pools serve a public model name, and under which upstream name: pure functions.

A *target* is ``(pool_id, upstream_model)``. A model with a ``ModelRoute`` is served by
its targets in order (the first is the primary, the others fall back), each keeping
only pools that have an enabled account listing the upstream model. A model without
one is served under its own name by every pool with an enabled account listing it,
in pool id order (the behaviour before routes existed, with a defined pool order).

Build :func:`route_table` once per config snapshot; per request a lookup in it (and
:func:`attempt_plan` for the request's ``fallbacks``) is all the routing there is.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

Target = tuple[int, str]  # (pool_id, upstream_model)


class RoutedAccount(Protocol):
    @property
    def pool_id(self) -> int: ...

    @property
    def models(self) -> Collection[str]: ...


A = TypeVar("A", bound=RoutedAccount)


class FallbackNotAllowed(Exception):
    """``fallbacks[index]`` names a model the key may not use (answer 403 ``model_not_allowed``)."""

    def __init__(self, index: int, model: str) -> None:
        super().__init__(f"This API key does not have access to model '{model}'")
        self.index = index
        self.model = model

    @property
    def param(self) -> str:
        return f"fallbacks[{self.index}]"


def routes_from_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, tuple[Target, ...]]:
    """``accounts.selectors.routes_for_snapshot()`` rows as ``{model: ((pool_id, upstream_model), ...)}``."""
    return {
        row["model"]: tuple((target["pool_id"], target["upstream_model"]) for target in row["targets"]) for row in rows
    }


def accounts_by_pool_model(accounts: Iterable[A]) -> dict[Target, list[A]]:
    """Group enabled accounts by ``(pool_id, model)`` for every model they list (order kept)."""
    grouped: dict[Target, list[A]] = {}
    for account in accounts:
        for model in account.models:
            grouped.setdefault((account.pool_id, model), []).append(account)
    return grouped


def route_targets(
    model: str, routes: Mapping[str, Sequence[Target]], accounts: Mapping[Target, Sequence[object]]
) -> list[Target]:
    """The targets serving ``model`` now, in the order to try them (see the module docstring).

    Empty: no enabled account can serve it (the caller tells 404 from 503 with the
    snapshot's known models and ``model in routes``).
    """
    explicit = routes.get(model)
    if explicit is not None:
        return [target for target in explicit if accounts.get(target)]
    return sorted(target for target, members in accounts.items() if target[1] == model and members)


def route_table(
    routes: Mapping[str, Sequence[Target]], accounts: Mapping[Target, Sequence[object]]
) -> dict[str, tuple[Target, ...]]:
    """:func:`route_targets` of every servable model, computed once (models with no target left out)."""
    names = set(routes) | {model for (_, model), members in accounts.items() if members}
    table: dict[str, tuple[Target, ...]] = {}
    for name in names:
        targets = route_targets(name, routes, accounts)
        if targets:
            table[name] = tuple(targets)
    return table


def fallback_models(model: str, fallbacks: Sequence[str] | None, allowed_models: Collection[str] | None) -> list[str]:
    """The request's ``fallbacks`` to try after ``model``: allowed, in order, without repeats.

    Raises :class:`FallbackNotAllowed` for the first entry outside ``allowed_models``
    (None: every model allowed), even if it repeats ``model``.
    """
    extra: list[str] = []
    for index, name in enumerate(fallbacks or ()):
        if allowed_models is not None and name not in allowed_models:
            raise FallbackNotAllowed(index, name)
        if name != model and name not in extra:
            extra.append(name)
    return extra


def attempt_plan(
    model: str, fallbacks: Sequence[str], table: Mapping[str, Sequence[Target]]
) -> list[tuple[str, int, str]]:
    """``(public_model, pool_id, upstream_model)`` for ``model`` then each fallback, in order.

    A target already planned for an earlier model is not repeated; fallbacks nothing
    serves are skipped. Empty: nothing can serve the request.
    """
    plan: list[tuple[str, int, str]] = []
    seen: set[Target] = set()
    for name in (model, *fallbacks):
        for target in table.get(name, ()):
            if target not in seen:
                seen.add(target)
                plan.append((name, target[0], target[1]))
    return plan
