"""The in-memory view of accounts, routes and prices that the hot path reads, and the
shape of a key (:class:`KeyInfo`, loaded on demand by gateway/config/keys.py).

A :class:`Snapshot` is immutable and built off the request path from the selectors
(``tenancy.selectors.prices_for_snapshot`` and
``accounts.selectors.accounts_for_snapshot``/``routes_for_snapshot``): it is small whatever
the number of keys. gateway/config/state.py hands it out and follows the change feed.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from accounts.routing.routes import Target, accounts_by_pool_model, route_table, routes_from_rows
from accounts.upstream.account import AccountInfo
from gateway.limits.engine import Scope
from tenancy.pricing import PriceTable, budget_window, usd_to_micros

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Limits:
    """The limits of one key or tenant; :meth:`scope` gives the engine's view at a moment.

    The budget window depends on the time (a day, a week, a month), so it is computed
    on first use and again only once it has ended; the scope, which depends on nothing else,
    is built once per window and shared by the requests in it (it is immutable).
    """

    __slots__ = (
        "_scope",
        "_window",
        "budget_micros",
        "budget_tokens",
        "concurrency",
        "fixed",
        "id",
        "name",
        "period",
        "rpm",
        "soft_percent",
        "tenant_id",
        "tpm",
    )

    def __init__(self, name: str, id: int, tenant_id: int, row: Mapping[str, Any], prefix: str = "") -> None:
        def get(key: str) -> Any:
            return row.get(prefix + key)

        self.name = name
        self.id = id
        self.tenant_id = tenant_id
        self.rpm: int | None = get("rpm")
        self.tpm: int | None = get("tpm")
        self.concurrency: int | None = get("concurrency")
        budget_usd = get("budget_usd")
        self.budget_micros = usd_to_micros(budget_usd) if budget_usd is not None else None
        self.budget_tokens: int | None = get("budget_tokens")
        self.period: str = get("budget_period") or "month"
        self.fixed = (get("budget_window_start"), get("budget_window_end"))
        self.soft_percent: int | None = get("budget_soft_percent")
        self._window: tuple[int, int] | None = None
        self._scope: tuple[tuple[int, int] | None, Scope] | None = None

    @property
    def empty(self) -> bool:
        return (
            self.rpm is None
            and self.tpm is None
            and self.concurrency is None
            and self.budget_micros is None
            and self.budget_tokens is None
        )

    def window(self, now: float) -> tuple[int, int] | None:
        """The budget window ``[start, end)`` containing ``now``; None outside a fixed one."""
        if self.period == "fixed":
            start, end = self.fixed
            if start is None or end is None:
                return None
            fixed = (int(start.timestamp()), int(end.timestamp()))
            return fixed if fixed[0] <= now < fixed[1] else None
        window = self._window
        if window is None or not window[0] <= now < window[1]:
            begin, finish = budget_window(self.period, datetime.fromtimestamp(now, UTC))
            window = self._window = (int(begin.timestamp()), int(finish.timestamp()))
        return window

    def scope(self, now: float) -> Scope:
        window = self.window(now) if self.budget_micros is not None or self.budget_tokens is not None else None
        cached = self._scope
        if cached is not None and cached[0] == window:
            return cached[1]
        scope = Scope(
            name=self.name,
            id=self.id,
            rpm=self.rpm,
            tpm=self.tpm,
            concurrency=self.concurrency,
            budget_tokens=self.budget_tokens if window else None,
            budget_micros=self.budget_micros if window else None,
            window_start=window[0] if window else 0,
            window_end=window[1] if window else 0,
            soft_percent=self.soft_percent,
            tenant_id=self.tenant_id,
        )
        self._scope = (window, scope)
        return scope


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: int
    tenant_id: int
    tenant_slug: str
    prefix: str
    digest: str
    # None: every model the pools serve.
    allowed_models: frozenset[str] | None
    expires_at: float | None  # epoch seconds
    max_output_tokens: int | None = None
    reasoning_efforts: frozenset[str] | None = None
    allowed_tools: frozenset[str] | None = None
    allowed_ips: tuple[IPNetwork, ...] | None = None
    key_limits: Limits | None = None
    tenant_limits: Limits | None = None
    # The stateful policy (the key's setting, else its tenant's): gateway/dataplane/stateful.py.
    stateful: bool = False

    def scopes(self, now: float) -> list[Scope]:
        """The engine scopes of this key's request: the key's then the tenant's."""
        return [limits.scope(now) for limits in (self.key_limits, self.tenant_limits) if limits is not None]


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A public model name as /v1/models lists it."""

    created: int
    owned_by: str


@dataclass(slots=True)
class Snapshot:
    token: object
    # (pool_id, upstream model) -> the pool's enabled accounts listing it.
    targets: dict[Target, list[AccountInfo]]
    # public model -> ordered (pool_id, upstream model) targets that can serve it now.
    routes: dict[str, tuple[Target, ...]]
    # Models some account or route names, servable or not: 503 rather than 404.
    known_models: frozenset[str]
    models: dict[str, ModelEntry]
    strategies: dict[int, str]  # pool_id -> selection strategy
    prices: PriceTable
    health_resets: dict[int, float | None]
    built_at: float = field(default_factory=time.monotonic)


def key_info(row: Mapping[str, Any], tenants: dict[int, Limits | None]) -> KeyInfo:
    """``tenants``: the tenants' limits built so far, shared by their keys (one object per tenant)."""
    expires = row.get("expires_at")
    allowed = row.get("allowed_models") or None
    ips = row.get("allowed_ips")
    efforts = row.get("reasoning_efforts")
    tools = row.get("allowed_tools")
    key_limits = Limits("key", row["id"], row["tenant_id"], row)
    tenant_id = row["tenant_id"]
    if tenant_id not in tenants:
        limits = Limits("tenant", tenant_id, tenant_id, row, prefix="tenant_")
        tenants[tenant_id] = None if limits.empty else limits
    return KeyInfo(
        key_id=row["id"],
        tenant_id=row["tenant_id"],
        tenant_slug=row["tenant_slug"],
        prefix=row["prefix"],
        digest=row["digest"],
        allowed_models=frozenset(allowed) if allowed else None,
        expires_at=expires.timestamp() if expires is not None else None,
        max_output_tokens=row.get("max_output_tokens"),
        reasoning_efforts=frozenset(efforts) if efforts is not None else None,
        allowed_tools=frozenset(tools) if tools is not None else None,
        allowed_ips=tuple(ipaddress.ip_network(net, strict=False) for net in ips) if ips is not None else None,
        key_limits=None if key_limits.empty else key_limits,
        tenant_limits=tenants[tenant_id],
        stateful=bool(row["stateful"] if row.get("stateful") is not None else row.get("tenant_stateful")),
    )


def build_snapshot(
    token: object,
    account_rows: Sequence[Mapping[str, Any]],
    route_rows: Sequence[Mapping[str, Any]] = (),
    price_rows: Sequence[Mapping[str, Any]] = (),
) -> Snapshot:
    """Turn selector rows into a snapshot (pure; no I/O). Keys are not in it: gateway/config/keys.py."""
    accounts: list[AccountInfo] = []
    known: set[str] = set()
    strategies: dict[int, str] = {}
    resets: dict[int, float | None] = {}
    models: dict[str, ModelEntry] = {}
    for row in account_rows:
        known.update(row["models"])
        strategies[row["pool_id"]] = row.get("strategy") or "weighted_round_robin"
        # An account's health starts at its creation too: SQLite reuses the ids of
        # deleted rows, and a new account must not inherit an old one's cooldown.
        moments = [m.timestamp() for m in (row.get("health_reset_at"), row.get("created_at")) if m is not None]
        resets[row["id"]] = max(moments) if moments else None
        if not row.get("enabled", True):
            continue
        accounts.append(
            AccountInfo(
                account_id=row["id"],
                pool_id=row["pool_id"],
                pool_name=row["pool_name"],
                responses_url=row["base_url"].rstrip("/") + "/responses",
                credential=row.get("credential") or None,
                models=frozenset(row["models"]),
                weight=max(1, int(row["weight"])),
                strip_fields=frozenset(row["strip_fields"]),
                max_concurrency=row.get("max_concurrency"),
                priority=int(row.get("priority") or 0),
            )
        )
        stamp = int(row["created_at"].timestamp()) if row.get("created_at") else 0
        for model in row["models"]:
            entry = models.get(model)
            if entry is None or stamp < entry.created:
                models[model] = ModelEntry(stamp, row["pool_name"])
    targets = accounts_by_pool_model(accounts)
    explicit = routes_from_rows(route_rows)
    routes = route_table(explicit, targets)
    known.update(explicit)
    listed = {name: models.get(name, ModelEntry(0, "gateway")) for name in routes}
    return Snapshot(
        token=token,
        targets=targets,
        routes=routes,
        known_models=frozenset(known),
        models=listed,
        strategies=strategies,
        prices=PriceTable.from_rows(price_rows),
        health_resets=resets,
    )
