"""Writes for pools and upstream accounts.

Every function validates its input and raises django.core.exceptions.ValidationError
with a human sentence on bad input (never containing a credential). Writes go through
``Model.save()`` so gateway.config.notify's post_save signals announce them to every replica.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from asgiref.sync import async_to_sync
from django.core.exceptions import ValidationError
from django.core.validators import validate_slug
from django.db import IntegrityError, transaction

from accounts.crypto import decrypt_credential, encrypt_credential
from accounts.health.machine import Reset, State, Transition
from accounts.infra.audit import audit_change, audit_fields, audit_snapshot, audited_update
from accounts.models import (
    DEFAULT_STRIP_FIELDS,
    AccountTransition,
    ModelRoute,
    ModelRouteTarget,
    Pool,
    UpstreamAccount,
    validate_base_url,
)

_INT_MAX = 2**31 - 1  # IntegerField / PositiveIntegerField bound on every backend
_MODEL_NAME_MAX = 200


class Unchanged(enum.Enum):
    UNCHANGED = "unchanged"


# Default of optional update arguments where None is a value ("unlimited").
UNCHANGED = Unchanged.UNCHANGED

# What the audit log shows of an account: the credential only as set / changed, never a value.
_ACCOUNT_AUDITED = ("pool", "name", "base_url", "models", "weight", "max_concurrency", "priority", "enabled")
_POOL_AUDITED = ("name", "strategy", "strip_fields")


def _account_audit(action: str, account: UpstreamAccount, before: dict[str, object] | None, **extra: object) -> None:
    audit_fields(action, account, _ACCOUNT_AUDITED, before, label=account.name or f"account {account.pk}", **extra)  # type: ignore[arg-type]


def _pool_update(pool: Pool, field: str, value: object) -> None:
    audited_update(pool, {field: value}, action="pool.update", fields=_POOL_AUDITED, tenant_id=None, label=pool.name)


def pool_get_or_create(*, name: str) -> Pool:
    """The pool called ``name``, created if missing. ValidationError if ``name`` is not a slug."""
    name = name.strip()
    if not name or len(name) > 64:
        raise ValidationError("pool name must be 1 to 64 characters.", code="invalid")
    try:
        validate_slug(name)
    except ValidationError:
        raise ValidationError(
            f"pool name {name!r} is not a slug: use letters, digits, '-' and '_'.", code="invalid"
        ) from None
    try:
        with transaction.atomic():
            pool, created = Pool.objects.get_or_create(name=name)
            if created:
                audit_fields("pool.create", pool, _POOL_AUDITED, None, label=name)
    except IntegrityError:
        # A concurrent create won the race: the pool exists now.
        pool = Pool.objects.get(name=name)
    return pool


def _clean_base_url(base_url: str) -> str:
    url = base_url.strip().rstrip("/")
    validate_base_url(url)
    if len(url) > 500:
        raise ValidationError("base URL is too long (500 characters at most).", code="max_length")
    return url


def _clean_models(models: Iterable[str]) -> list[str]:
    if isinstance(models, str):
        raise ValidationError("models must be a list of model names, not a string.", code="invalid")
    result: list[str] = []
    for model in models:
        if not isinstance(model, str) or not model.strip():
            raise ValidationError("model names must be non-empty strings.", code="invalid")
        model = model.strip()
        if model not in result:
            result.append(model)
    if not result:
        raise ValidationError("an upstream account needs at least one model.", code="required")
    return result


def upstream_account_create(
    *,
    pool: Pool,
    base_url: str,
    api_key: str | None = None,
    models: Iterable[str] = (),
    weight: int = 1,
    name: str = "",
    enabled: bool = True,
    max_concurrency: int | None = None,
    priority: int = 0,
) -> UpstreamAccount:
    """Add an account serving ``models`` at ``{base_url}/responses`` to ``pool``.

    ``base_url``: http(s) with a host; stored without trailing slash. ``models``: at
    least one non-empty name (duplicates dropped). ``weight`` >= 1. ``api_key`` None
    or blank: no Authorization header is sent; otherwise stored Fernet-encrypted.
    ``max_concurrency``: None (unlimited) or >= 1, per gateway process. ``priority``:
    fill-first order, lower first.
    """
    url = _clean_base_url(base_url)
    model_list = _clean_models(models)
    weight = _clean_weight(weight)
    max_concurrency = _clean_max_concurrency(max_concurrency)
    priority = _clean_priority(priority)
    if len(name) > 200:
        raise ValidationError("account name is too long (200 characters at most).", code="max_length")
    secret = (api_key or "").strip()
    account = UpstreamAccount(
        pool=pool,
        name=name.strip(),
        base_url=url,
        credential_encrypted=encrypt_credential(secret) if secret else "",
        models=model_list,
        weight=weight,
        enabled=enabled,
        max_concurrency=max_concurrency,
        priority=priority,
    )
    with transaction.atomic():
        account.save()
        _account_audit("account.create", account, None, secrets_changed=["credential"] if secret else [])
    return account


def _clean_weight(weight: object) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= _INT_MAX:
        raise ValidationError("weight must be a whole number of at least 1.", code="min_value")
    return weight


def _clean_max_concurrency(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _INT_MAX:
        raise ValidationError("max concurrency must be a whole number of at least 1, or unlimited.", code="min_value")
    return value


def _clean_priority(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -_INT_MAX <= value <= _INT_MAX:
        raise ValidationError("priority must be a whole number (lower is used first).", code="invalid")
    return value


def upstream_account_set_enabled(*, account: UpstreamAccount, enabled: bool, reason: str = "") -> UpstreamAccount:
    """Enable or disable ``account`` as an operator (no write if unchanged).

    Disabling records ``reason`` (shown in the admin and by `manage.py account_health`) and a transition to DISABLED.
    Enabling clears the reason and re-admits the account (:func:`account_health_reset`),
    so an account disabled by an upstream auth failure can be turned back on in one step.
    """
    reason = reason.strip()
    if len(reason) > 500:
        raise ValidationError("the reason is too long (500 characters at most).", code="max_length")
    if account.enabled == enabled:
        if not enabled and reason and account.disabled_reason != reason:
            account.disabled_reason = reason
            account.save(update_fields=["disabled_reason"])
        return account
    with transaction.atomic():
        before = audit_snapshot(account, _ACCOUNT_AUDITED)
        account.enabled = enabled
        account.disabled_reason = "" if enabled else reason
        account.save(update_fields=["enabled", "disabled_reason"])
        _account_audit("account.enable" if enabled else "account.disable", account, before)
        if not enabled:
            detail = f": {reason}" if reason else ""
            _record(account.pk, _latest_state(account.pk), State.DISABLED, f"disabled by operator{detail}")
    if enabled and account_health_reset(account=account, reason="enabled by operator") is None:
        _record(account.pk, _latest_state(account.pk), State.HEALTHY, "enabled by operator")
    return account


def upstream_account_update(
    *,
    account: UpstreamAccount,
    weight: int | None = None,
    max_concurrency: int | Unchanged | None = UNCHANGED,
    priority: int | None = None,
    models: Iterable[str] | None = None,
    enabled: bool | None = None,
    disabled_reason: str = "",
    name: str | None = None,
    base_url: str | None = None,
    api_key: str | Unchanged | None = UNCHANGED,
) -> UpstreamAccount:
    """Change the given settings of ``account`` (None / UNCHANGED: keep). One save, if any.

    ``max_concurrency=None`` means unlimited. ``enabled`` goes through
    :func:`upstream_account_set_enabled` (``disabled_reason`` with it). ``api_key``: the new
    credential (stored encrypted; None or blank: send none); audited as changed, never shown.
    """
    wanted: dict[str, object] = {}
    if name is not None:
        if len(name.strip()) > 200:
            raise ValidationError("account name is too long (200 characters at most).", code="max_length")
        wanted["name"] = name.strip()
    if base_url is not None:
        wanted["base_url"] = _clean_base_url(base_url)
    secret_changed = api_key is not UNCHANGED
    if secret_changed:
        secret = (api_key or "").strip()  # type: ignore[union-attr]
        wanted["credential_encrypted"] = encrypt_credential(secret) if secret else ""
    if weight is not None:
        wanted["weight"] = _clean_weight(weight)
    if max_concurrency is not UNCHANGED:
        wanted["max_concurrency"] = _clean_max_concurrency(max_concurrency)
    if priority is not None:
        wanted["priority"] = _clean_priority(priority)
    if models is not None:
        wanted["models"] = _clean_models(models)
    fields = [field for field, value in wanted.items() if getattr(account, field) != value]
    before = audit_snapshot(account, _ACCOUNT_AUDITED)
    for field in fields:
        setattr(account, field, wanted[field])
    with transaction.atomic():
        if fields:
            account.save(update_fields=fields)
            changed = ["credential"] if secret_changed else []
            _account_audit("account.update", account, before, secrets_changed=changed)
        if enabled is not None:
            upstream_account_set_enabled(account=account, enabled=enabled, reason=disabled_reason)
    return account


def pool_set_strategy(*, pool: Pool, strategy: str) -> Pool:
    """Set how ``pool`` spreads traffic: one of ``Pool.Strategy`` (applies without a restart)."""
    value = strategy.strip() if isinstance(strategy, str) else strategy
    if value not in Pool.Strategy.values:
        raise ValidationError(
            f"{strategy!r} is not a strategy: choose from {', '.join(Pool.Strategy.values)}.", code="invalid"
        )
    _pool_update(pool, "strategy", value)
    return pool


def _clean_model_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValidationError(f"{what} must be a non-empty string.", code="required")
    name = name.strip()
    if len(name) > _MODEL_NAME_MAX:
        raise ValidationError(f"{what} is too long ({_MODEL_NAME_MAX} characters at most).", code="max_length")
    return name


def model_route_set(*, model: str, targets: Sequence[tuple[str, str]]) -> ModelRoute:
    """Route the public ``model`` to ``targets``: ``(pool name, upstream model)`` pairs in order.

    The first target is the primary, later ones are tried when it cannot serve. Replaces
    any previous route of ``model``. Every pool must exist; a pair may appear once.
    """
    public = _clean_model_name(model, "the model name")
    if isinstance(targets, str | bytes) or not targets:
        raise ValidationError("a route needs at least one target (pool, upstream model).", code="required")
    cleaned: list[tuple[Pool, str]] = []
    pools: dict[str, Pool] = {}
    for entry in targets:
        if not isinstance(entry, tuple | list) or len(entry) != 2:
            raise ValidationError("each target is a (pool name, upstream model) pair.", code="invalid")
        pool_name, upstream = entry
        if not isinstance(pool_name, str) or not pool_name.strip():
            raise ValidationError("each target needs a pool name.", code="required")
        pool_name = pool_name.strip()
        upstream = _clean_model_name(upstream, "the upstream model name")
        if pool_name not in pools:
            found = Pool.objects.filter(name=pool_name).first()
            if found is None:
                raise ValidationError(f"unknown pool {pool_name!r}.", code="invalid")
            pools[pool_name] = found
        if any(p.name == pool_name and u == upstream for p, u in cleaned):
            raise ValidationError(f"target {pool_name}:{upstream} is listed twice.", code="invalid")
        cleaned.append((pools[pool_name], upstream))
    with transaction.atomic():
        route, created = ModelRoute.objects.select_for_update().get_or_create(model=public)
        before = None if created else {"targets": _route_targets(route)}
        route.targets.all().delete()
        for position, (pool, upstream) in enumerate(cleaned):
            ModelRouteTarget(route=route, position=position, pool=pool, upstream_model=upstream).save()
        route.save(update_fields=["updated_at"])  # announces the change even if only targets moved
        audit_change("route.set", target=route, before=before, after={"targets": _route_targets(route)}, label=public)
    return route


def _route_targets(route: ModelRoute) -> list[str]:
    return [f"{t.pool.name}:{t.upstream_model}" for t in route.targets.select_related("pool").order_by("position")]


def model_route_delete(*, model: str) -> bool:
    """Remove the route of ``model`` (it is then served by name again); False if there was none."""
    route = ModelRoute.objects.filter(model=model.strip()).first()
    if route is None:
        return False
    with transaction.atomic():
        audit_change(
            "route.delete", target=route, before={"targets": _route_targets(route)}, after=None, label=route.model
        )
        route.delete()
    return True


def pool_delete(*, pool: Pool) -> None:
    """Delete ``pool`` if nothing uses it; ValidationError naming what does (accounts, routes)."""
    with transaction.atomic():
        accounts = UpstreamAccount.objects.filter(pool=pool).count()
        routes = sorted(set(ModelRouteTarget.objects.filter(pool=pool).values_list("route__model", flat=True)))
        if accounts or routes:
            uses = ([f"{accounts} account(s)"] if accounts else []) + (
                [f"routes {', '.join(routes)}"] if routes else []
            )
            raise ValidationError(f"pool {pool.name!r} is in use by {' and '.join(uses)}: move or delete them first.")
        audit_change(
            "pool.delete", target=pool, before=audit_snapshot(pool, _POOL_AUDITED), after=None, label=pool.name
        )
        pool.delete()


# --- health ---------------------------------------------------------------------------------


def _at(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC)


def account_transitions_write(rows: Sequence[Transition]) -> int:
    """Store health transitions (accounts.health.machine.Transition) in one bulk insert.

    Rows of accounts deleted meanwhile are skipped. Returns how many were written.
    """
    if not rows:
        return 0
    existing = set(UpstreamAccount.objects.filter(pk__in={row.account_id for row in rows}).values_list("pk", flat=True))
    objects = [
        AccountTransition(
            account_id=row.account_id,
            from_state=State(row.from_state).value,
            to_state=State(row.to_state).value,
            reason=row.reason[:500],
            at=datetime.fromtimestamp(row.at, tz=UTC),
            until=_at(row.until),
        )
        for row in rows
        if row.account_id in existing
    ]
    AccountTransition.objects.bulk_create(objects)
    return len(objects)


def _latest_state(account_id: int) -> State:
    latest = AccountTransition.objects.filter(account_id=account_id).order_by("-at", "-pk").first()
    return State(latest.to_state) if latest is not None else State.HEALTHY


def _record(account_id: int, from_state: State, to_state: State, reason: str) -> Transition:
    transition = Transition(account_id, from_state, to_state, reason, time.time())
    account_transitions_write([transition])
    return transition


def account_health_reset(*, account: UpstreamAccount, reason: str = "reset by operator") -> Transition | None:
    """Re-admit ``account``: HEALTHY, cooldowns and failure counters cleared, on every replica.

    With Redis the shared record is reset and published at once; in every mode
    ``health_reset_at`` is stamped, which reaches each replica with the next config
    snapshot (``HealthStore.apply_resets``). Returns the recorded transition, or None
    if the account was not known to be unhealthy.
    """
    from accounts.health import store as health_store

    now = time.time()
    client = health_store.sync_client()
    transition: Transition | None = None
    if client is not None:
        _, transitions = health_store.apply_sync(client, account.pk, [Reset(reason)], now)
        transition = transitions[0] if transitions else None
    else:
        latest = _latest_state(account.pk)
        if latest is not State.HEALTHY:
            transition = Transition(account.pk, latest, State.HEALTHY, reason, now)
    with transaction.atomic():
        account.health_reset_at = _at(now)
        account.save(update_fields=["health_reset_at"])
        if transition is not None:
            account_transitions_write([transition])
    return transition


# The rule strip_fields_clean enforces, as the admin states it next to the field.
STRIP_FIELDS_HELP = (
    f"null: the default list {DEFAULT_STRIP_FIELDS}. "
    "A list: exactly these fields (a subset of the default; [] strips nothing)."
)


def strip_fields_clean(fields: Iterable[str] | None) -> list[str] | None:
    """Validate a pool's strip list: None (the default list) or a subset of DEFAULT_STRIP_FIELDS."""
    if fields is None:
        return None
    if isinstance(fields, str) or not isinstance(fields, Iterable):
        raise ValidationError("strip fields must be a list of field names.", code="invalid")
    value: list[str] = []
    for field in fields:
        name = field.strip() if isinstance(field, str) else field
        if name not in DEFAULT_STRIP_FIELDS:
            raise ValidationError(
                f"{name!r} is not a strippable field: choose from {', '.join(DEFAULT_STRIP_FIELDS)}.",
                code="invalid",
            )
        if name not in value:
            value.append(name)
    return value


def pool_set_strip_fields(*, pool: Pool, fields: Iterable[str] | None) -> Pool:
    """Set which top-level request fields ``pool`` strips before forwarding.

    None restores DEFAULT_STRIP_FIELDS. A list narrows it: every entry must be one of
    DEFAULT_STRIP_FIELDS (the seed contract's list); an empty list strips nothing.
    """
    _pool_update(pool, "strip_fields", strip_fields_clean(fields))
    return pool


@dataclass(frozen=True, slots=True)
class ProbeAnswer:
    """What probing one account now found: the HTTP status (None: no answer), the health
    event the answer reads as (``success``, ``rate_limited``, ``auth_failure``, ``server_error``),
    the time it took and, when it failed, a short error type (never the credential)."""

    status: int | None
    verdict: str
    latency_ms: float
    error: str


# The one outbound-HTTP seam of an operator's probe: tests replace it with a stub client.
def probe_client() -> Any:
    from accounts.upstream.client import UpstreamClient

    return UpstreamClient(transport="httpx", connect_timeout=5.0, read_timeout=20.0, max_connections=1)


def upstream_account_probe(*, account: UpstreamAccount) -> ProbeAnswer:
    """Send the prober's probe (``accounts.health.probing.probe_one``) to ``account`` now.

    The answer is returned and audited (``account.test``); it does not change the account's
    health (the serving processes' own prober does that)."""
    from accounts.health.probing import probe_one
    from accounts.upstream.account import AccountInfo

    if not account.models:
        raise ValidationError({"models": "the account serves no model to probe with"})
    target = AccountInfo(
        account_id=account.pk,
        pool_id=account.pool_id,
        responses_url=account.base_url.rstrip("/") + "/responses",
        credential=decrypt_credential(account.credential_encrypted) if account.credential_encrypted else None,
        models=frozenset(account.models),
    )

    async def run() -> tuple[int | None, object, str]:
        client = probe_client()
        try:
            return await probe_one(client, target)
        finally:
            await client.aclose()

    started = time.perf_counter()
    status, event, _detail = async_to_sync(run)()
    latency_ms = round((time.perf_counter() - started) * 1000, 1)
    verdict = _EVENT_NAMES.get(type(event).__name__, type(event).__name__.lower())
    error = "" if verdict == "success" else (f"http_{status}" if status is not None else "no_answer")
    answer = ProbeAnswer(status=status, verdict=verdict, latency_ms=latency_ms, error=error)
    audit_change(
        "account.test",
        target=account,
        before={},
        after={"status": status, "verdict": verdict, "error": error},
        label=account.name or str(account.pk),
    )
    return answer


_EVENT_NAMES = {
    "Success": "success",
    "RateLimited": "rate_limited",
    "AuthFailure": "auth_failure",
    "ServerError": "server_error",
    "Reset": "reset",
}
