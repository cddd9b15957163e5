"""Reads of pools and upstream accounts that other layers depend on."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from django.db.models import OuterRef, QuerySet, Subquery

from accounts.crypto import CredentialDecryptError, decrypt_credential
from accounts.health.machine import Health, State
from accounts.models import AccountTransition, ModelRoute, UpstreamAccount

logger = logging.getLogger(__name__)


def accounts_for_snapshot() -> list[dict[str, Any]]:
    """Every upstream account with its pool, as plain dicts, in one query.

    Keys: ``id, pool_id, pool_name, name, provider, base_url, models, weight,
    enabled, strip_fields, credential, created_at``, and for selection and health
    ``strategy`` (the pool's, a ``Pool.Strategy`` value), ``max_concurrency`` (None:
    unlimited), ``priority`` and ``health_reset_at`` (datetime or None; feed it to
    ``HealthStore.apply_resets``). ``credential`` is the decrypted
    upstream API key (str) or None. ``strip_fields`` is the pool's effective list.

    Disabled accounts are included with ``enabled=False`` and ``credential=None``
    (never decrypted), so the gateway can tell "model served by a disabled account"
    (503) from "unknown model" (404). An enabled account whose credential cannot be
    decrypted (GATEWAY_ENCRYPTION_KEY changed) is reported as disabled and logged by
    id: sending it without its key would only earn 401s from the upstream.
    """
    return _rows(UpstreamAccount.objects.select_related("pool").order_by("id"))


def _rows(queryset: QuerySet[UpstreamAccount]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for account in queryset:
        enabled = account.enabled
        credential: str | None = None
        if enabled and account.credential_encrypted:
            try:
                credential = decrypt_credential(account.credential_encrypted)
            except CredentialDecryptError:
                logger.error(
                    "upstream account %s: credential cannot be decrypted with the current "
                    "GATEWAY_ENCRYPTION_KEY; account left out until it is re-entered",
                    account.pk,
                )
                enabled = False
        rows.append(
            {
                "id": account.pk,
                "pool_id": account.pool_id,
                "pool_name": account.pool.name,
                "name": account.name,
                "provider": account.provider,
                "base_url": account.base_url,
                "models": list(account.models),
                "weight": account.weight,
                "enabled": enabled,
                "strip_fields": account.pool.effective_strip_fields(),
                "credential": credential,
                "created_at": account.created_at,
                "strategy": account.pool.strategy,
                "max_concurrency": account.max_concurrency,
                "priority": account.priority,
                "health_reset_at": account.health_reset_at,
            }
        )
    return rows


def routes_for_snapshot() -> list[dict[str, Any]]:
    """Every model route with its ordered targets, in two queries.

    Rows: ``{"model": str, "targets": [{"pool_id", "pool_name", "upstream_model"}, ...]}``
    with targets in position order. A route whose pools were all deleted has no targets
    (the model then answers 503, not 404). Feed to ``accounts.routing.routes.routes_from_rows``.
    """
    rows: list[dict[str, Any]] = []
    for route in ModelRoute.objects.prefetch_related("targets__pool").order_by("model"):
        targets = sorted(route.targets.all(), key=lambda target: target.position)
        rows.append(
            {
                "model": route.model,
                "targets": [
                    {"pool_id": t.pool_id, "pool_name": t.pool.name, "upstream_model": t.upstream_model}
                    for t in targets
                ],
            }
        )
    return rows


def account_latest_transitions(account_ids: Iterable[int] | None = None) -> dict[int, AccountTransition]:
    """The most recent transition of each account (of ``account_ids``, or all) that has one."""
    latest = AccountTransition.objects.filter(account=OuterRef("pk")).order_by("-at", "-pk").values("pk")[:1]
    accounts = UpstreamAccount.objects.all()
    if account_ids is not None:
        accounts = accounts.filter(pk__in=list(account_ids))
    ids = [pk for pk in accounts.annotate(last=Subquery(latest)).values_list("last", flat=True) if pk is not None]
    return {row.account_id: row for row in AccountTransition.objects.filter(pk__in=ids)}


def account_health_states(account_ids: Iterable[int]) -> dict[int, Health]:
    """The current health of accounts, as well as this process can know it.

    With Redis: the shared records (exact). Embedded: rebuilt from each account's latest
    recorded transition (the gateway writes them within about a second). Accounts with
    nothing recorded are absent (healthy).
    """
    from accounts.health import store as health_store

    ids = list(account_ids)
    client = health_store.sync_client()
    if client is not None:
        return health_store.read_states_sync(client, ids)
    states: dict[int, Health] = {}
    for account_id, row in account_latest_transitions(ids).items():
        states[account_id] = Health(
            account_id,
            state=State(row.to_state),
            until=row.until.timestamp() if row.until else None,
            reason=row.reason,
            since=row.at.timestamp(),
        )
    return states


def account_health_overview(*, pool_name: str | None = None, limit: int = 5) -> list[dict[str, Any]]:
    """Each account (of ``pool_name``, or all) with its health and last ``limit`` transitions.

    Keys: ``id, name, pool_name, enabled, disabled_reason, state`` (effective now: an
    expired cooldown reads healthy), ``until`` (epoch s or None), ``reason``,
    ``transitions`` (newest first: AccountTransition objects). For the operator command
    and the admin; one query per account for the transitions.
    """
    accounts = UpstreamAccount.objects.select_related("pool").order_by("pool__name", "id")
    if pool_name is not None:
        accounts = accounts.filter(pool__name=pool_name)
    account_list = list(accounts)
    states = account_health_states(a.pk for a in account_list)
    now = time.time()
    overview: list[dict[str, Any]] = []
    for account in account_list:
        health = states.get(account.pk) or Health(account.pk)
        overview.append(
            {
                "id": account.pk,
                "name": account.name,
                "pool_name": account.pool.name,
                "enabled": account.enabled,
                "disabled_reason": account.disabled_reason,
                "state": health.effective_state(now).value,
                "until": health.until if health.until is not None and health.until > now else None,
                "reason": health.reason,
                "transitions": list(account.transitions.order_by("-at", "-pk")[:limit]),
            }
        )
    return overview
