"""The in-memory view of keys, tenants and accounts that the hot path reads.

A :class:`Snapshot` is immutable and built off the request path from two selectors
(``tenancy.selectors.apikeys_for_snapshot`` and ``accounts.selectors.accounts_for_snapshot``).
:class:`ConfigState` hands out the current snapshot and rebuilds it when the change
token of ``gateway.notify`` moves, so a change made on any replica (or by an operator
command) is seen by the very next request here, with no database query per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async

logger = logging.getLogger(__name__)

# A snapshot older than this is rebuilt in the background even without a change
# token, so edits made outside the services (raw SQL) still arrive eventually.
MAX_SNAPSHOT_AGE = 60.0


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


@dataclass(frozen=True, slots=True)
class AccountInfo:
    account_id: int
    pool_id: int
    pool_name: str
    responses_url: str
    credential: str | None
    models: frozenset[str]
    weight: int
    strip_fields: frozenset[str]

    def __repr__(self) -> str:  # never print the credential
        return f"AccountInfo(id={self.account_id}, pool={self.pool_name!r}, url={self.responses_url!r})"


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """The enabled accounts serving one model, with cumulative weights for selection."""

    accounts: tuple[AccountInfo, ...]
    cum_weights: tuple[int, ...]
    created: int
    owned_by: str


@dataclass(slots=True)
class Snapshot:
    token: object
    keys: dict[str, KeyInfo]
    routes: dict[str, ModelRoute]
    # Models listed by some account that is disabled now: 503 rather than 404.
    known_models: frozenset[str]
    built_at: float = field(default_factory=time.monotonic)


def build_snapshot(
    token: object, key_rows: Sequence[Mapping[str, Any]], account_rows: Sequence[Mapping[str, Any]]
) -> Snapshot:
    """Turn selector rows into a snapshot (pure; no I/O)."""
    keys: dict[str, KeyInfo] = {}
    for row in key_rows:
        expires = row.get("expires_at")
        allowed = row.get("allowed_models") or None
        keys[row["prefix"]] = KeyInfo(
            key_id=row["id"],
            tenant_id=row["tenant_id"],
            tenant_slug=row["tenant_slug"],
            prefix=row["prefix"],
            digest=row["digest"],
            allowed_models=frozenset(allowed) if allowed else None,
            expires_at=expires.timestamp() if expires is not None else None,
        )
    by_model: dict[str, list[AccountInfo]] = {}
    created: dict[str, int] = {}
    owner: dict[str, str] = {}
    known: set[str] = set()
    for row in account_rows:
        known.update(row["models"])
        if not row.get("enabled", True):
            continue
        account = AccountInfo(
            account_id=row["id"],
            pool_id=row["pool_id"],
            pool_name=row["pool_name"],
            responses_url=row["base_url"].rstrip("/") + "/responses",
            credential=row.get("credential") or None,
            models=frozenset(row["models"]),
            weight=max(1, int(row["weight"])),
            strip_fields=frozenset(row["strip_fields"]),
        )
        stamp = int(row["created_at"].timestamp()) if row.get("created_at") else 0
        for model in row["models"]:
            by_model.setdefault(model, []).append(account)
            created[model] = min(created.get(model, stamp), stamp)
            owner.setdefault(model, row["pool_name"])
    routes: dict[str, ModelRoute] = {}
    for model, accounts in by_model.items():
        total = 0
        cum: list[int] = []
        for account in accounts:
            total += account.weight
            cum.append(total)
        routes[model] = ModelRoute(tuple(accounts), tuple(cum), created[model], owner[model])
    return Snapshot(token=token, keys=keys, routes=routes, known_models=frozenset(known))


def load_snapshot(token: object) -> Snapshot:
    """Read the configuration from the database (blocking; call from a worker thread)."""
    from accounts.selectors import accounts_for_snapshot
    from tenancy.selectors import apikeys_for_snapshot

    return build_snapshot(token, apikeys_for_snapshot(), accounts_for_snapshot())


class ConfigState:
    """Hands out the current snapshot; rebuilds it when the change token moves.

    ``token_source`` is awaited once per request: it is the only per-request cost
    (an ``os.stat`` in embedded mode, one Redis GET otherwise).
    """

    def __init__(self, token_source: Callable[[], Any], loader: Callable[[object], Snapshot] = load_snapshot) -> None:
        self._token_source = token_source
        self._loader = loader
        self._snapshot: Snapshot | None = None
        self._lock: asyncio.Lock | None = None
        self._refreshing = False
        self._refresh_task: asyncio.Task[None] | None = None

    async def current(self) -> Snapshot:
        token = await self._token_source()
        snapshot = self._snapshot
        if snapshot is not None and snapshot.token == token:
            if time.monotonic() - snapshot.built_at > MAX_SNAPSHOT_AGE and not self._refreshing:
                self._refreshing = True
                self._refresh_task = asyncio.get_running_loop().create_task(self._refresh(token))
            return snapshot
        return await self._reload(token)

    async def _reload(self, token: object, *, force: bool = False) -> Snapshot:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            snapshot = self._snapshot
            if not force and snapshot is not None and snapshot.token == token:
                return snapshot
            try:
                # The token is read before loading, so a change racing the load
                # leaves a stale token behind and triggers one more reload.
                snapshot = await sync_to_async(self._loader, thread_sensitive=False)(token)
            except Exception:
                if self._snapshot is None:
                    raise
                logger.exception("configuration reload failed; serving the previous snapshot")
                return self._snapshot
            self._snapshot = snapshot
            return snapshot

    async def _refresh(self, token: object) -> None:
        try:
            await self._reload(token, force=True)
        finally:
            self._refreshing = False
