"""Writes for tenants, API keys, their limits, prices, budget alerts and usage records.

Every function validates its input and raises django.core.exceptions.ValidationError
with a human sentence on bad input, so commands and views can show it as is.
Config-relevant writes (tenants, keys and their limits, prices) go through
``Model.save()`` so the post_save signals of gateway.config.notify announce them to every
replica, which applies them on its next request; the usage path deliberately does not.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TypedDict, TypeVar, Unpack
from urllib.parse import urlsplit

import httpx
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import Case, DateTimeField, F, Q, Value, When
from django.utils import timezone

from accounts.models import UpstreamAccount
from tenancy import pricing
from tenancy.keys import generate_api_key, key_digest
from tenancy.models import (
    BUDGET_USD_MAX_DIGITS,
    BUDGET_USD_PLACES,
    COST_MAX_DIGITS,
    COST_PLACES,
    PRICE_MAX_DIGITS,
    PRICE_PLACES,
    ApiKey,
    BudgetAlert,
    BudgetAlertKind,
    BudgetPeriod,
    BudgetScope,
    PriceVersion,
    Tenant,
    UsageRecord,
)
from tenancy.pricing import TOKEN_FIELDS

logger = logging.getLogger(__name__)

# Prefix collisions (10 base62 chars) are astronomically rare; a few retries suffice.
_PREFIX_ATTEMPTS = 5
# Keys per UPDATE in usage_records_write: each key costs a few SQL parameters and
# SQLite caps the parameter count per statement.
_LAST_USED_CHUNK = 200

# Upper bounds of the limit columns (PositiveIntegerField / PositiveBigIntegerField).
_INT_MAX = 2**31 - 1
_BIGINT_MAX = 2**63 - 1
_COST_QUANTUM = Decimal(1).scaleb(-COST_PLACES)
_COST_LIMIT = Decimal(10) ** (COST_MAX_DIGITS - COST_PLACES)  # what UsageRecord.cost can hold


# --- limits ---------------------------------------------------------------------------


class TenantLimits(TypedDict, total=False):
    """Limits of a tenant (and of a key). Absent: unchanged (default on create); None: unlimited.

    ``rpm``/``tpm``/``concurrency``/``budget_tokens``: whole numbers >= 1. ``budget_usd``: a
    positive amount of USD with at most 6 decimals (Decimal, int or str; no float).
    ``budget_period``: day | week | month | fixed (not nullable). ``budget_window_start``/
    ``budget_window_end``: aware datetimes, required with ``fixed`` and refused otherwise
    (switching away from ``fixed`` clears them). ``budget_soft_percent``: 1..100, None for
    no soft alert.
    """

    rpm: int | None
    tpm: int | None
    concurrency: int | None
    budget_usd: Decimal | int | str | None
    budget_tokens: int | None
    budget_period: str
    budget_window_start: datetime | None
    budget_window_end: datetime | None
    budget_soft_percent: int | None


class ApiKeyLimits(TenantLimits, total=False):
    """A key's limits and request policy. None: no restriction.

    ``max_output_tokens``: >= 1. ``reasoning_efforts``/``allowed_tools``: names, stripped,
    lowercased and deduplicated; an empty list allows none (no ``reasoning.effort`` value,
    no tool). ``allowed_ips``: a non-empty list of addresses or CIDR networks, stored
    normalized (``10.1.2.3`` -> ``10.1.2.3/32``; host bits cleared).
    """

    max_output_tokens: int | None
    reasoning_efforts: Sequence[str] | None
    allowed_tools: Sequence[str] | None
    allowed_ips: Sequence[str] | None


TENANT_LIMIT_FIELDS: frozenset[str] = frozenset(TenantLimits.__optional_keys__)
APIKEY_LIMIT_FIELDS: frozenset[str] = frozenset(ApiKeyLimits.__optional_keys__)
_INT_LIMITS: dict[str, int] = {
    "rpm": _INT_MAX,
    "tpm": _BIGINT_MAX,
    "concurrency": _INT_MAX,
    "budget_tokens": _BIGINT_MAX,
    "max_output_tokens": _INT_MAX,
}


def _clean_positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _INT_LIMITS[name]:
        raise ValidationError(
            f"{name} must be a whole number from 1 to {_INT_LIMITS[name]} (got {value!r}).", code="invalid"
        )
    return value


def _clean_decimal(name: str, value: Any, *, max_digits: int, places: int, positive: bool) -> Decimal:
    """A finite Decimal >= 0 (> 0 if ``positive``) with at most ``places`` decimals, fitting the column."""
    if isinstance(value, bool | float) or not isinstance(value, Decimal | int | str):
        # Floats are refused: 0.1 is not 0.1, and these are amounts of money.
        raise ValidationError(f"{name} must be a decimal number such as 12.50 (got {value!r}).", code="invalid")
    try:
        amount = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise ValidationError(
            f"{name} must be a decimal number such as 12.50 (got {value!r}).", code="invalid"
        ) from None
    if not amount.is_finite() or amount < 0 or (positive and amount == 0):
        least = "greater than 0" if positive else "0 or more"
        raise ValidationError(f"{name} must be {least} (got {value!r}).", code="invalid")
    if amount >= Decimal(10) ** (max_digits - places):
        raise ValidationError(f"{name} is too large (got {value!r}).", code="invalid")
    quantum = Decimal(1).scaleb(-places)
    if amount != amount.quantize(quantum):
        raise ValidationError(f"{name} has more than {places} decimal places (got {value!r}).", code="invalid")
    return amount.quantize(quantum)


def _clean_aware(name: str, value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise ValidationError(f"{name} must be a datetime.", code="invalid")
    if timezone.is_naive(value):
        raise ValidationError(f"{name} must be timezone-aware.", code="invalid")
    return value


def _require_aware(name: str, value: Any) -> datetime:
    moment = _clean_aware(name, value)
    if moment is None:
        raise ValidationError(f"{name} is required.", code="required")
    return moment


def _clean_names(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValidationError(f"{name} must be a list of names, not {type(value).__name__}.", code="invalid")
    result: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ValidationError(f"{name} must contain non-empty names.", code="invalid")
        item = item.strip().lower()
        if len(item) > 64:
            raise ValidationError(f"{name} entry {item[:64]!r}... is too long (64 characters at most).", code="invalid")
        if item not in result:
            result.append(item)
    return result


def _clean_cidrs(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValidationError("allowed_ips must be a list of addresses or CIDR networks.", code="invalid")
    result: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ValidationError("allowed_ips must contain non-empty addresses or networks.", code="invalid")
        try:
            network = str(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValidationError(f"allowed_ips: {item.strip()!r} is not an IP address or CIDR network.") from None
        if network not in result:
            result.append(network)
    if not result:
        raise ValidationError("allowed_ips must list at least one network (None allows any).", code="invalid")
    return result


def _clean_limits(values: Mapping[str, Any], *, allowed: frozenset[str]) -> dict[str, Any]:
    """Validate and normalize each given limit on its own (cross-field rules: _apply_limits)."""
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValidationError(f"unknown limit(s): {', '.join(unknown)}.", code="invalid")
    cleaned: dict[str, Any] = {}
    for name, value in values.items():
        if name in _INT_LIMITS:
            cleaned[name] = _clean_positive_int(name, value)
        elif name == "budget_usd":
            cleaned[name] = (
                None
                if value is None
                else _clean_decimal(
                    name, value, max_digits=BUDGET_USD_MAX_DIGITS, places=BUDGET_USD_PLACES, positive=True
                )
            )
        elif name == "budget_period":
            if value not in BudgetPeriod.values:
                raise ValidationError(
                    f"budget_period must be one of {', '.join(BudgetPeriod.values)} (got {value!r}).", code="invalid"
                )
            cleaned[name] = str(value)
        elif name in ("budget_window_start", "budget_window_end"):
            cleaned[name] = _clean_aware(name, value)
        elif name == "budget_soft_percent":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100):
                raise ValidationError(
                    f"budget_soft_percent must be a whole number from 1 to 100 (got {value!r}).", code="invalid"
                )
            cleaned[name] = value
        elif name in ("reasoning_efforts", "allowed_tools"):
            cleaned[name] = _clean_names(name, value)
        elif name == "allowed_ips":
            cleaned[name] = _clean_cidrs(value)
    return cleaned


def _apply_limits(obj: Tenant | ApiKey, cleaned: Mapping[str, Any]) -> list[str]:
    """Set ``cleaned`` on ``obj``, enforce the budget window rules; return the changed fields."""
    changed: list[str] = []

    def put(name: str, value: Any) -> None:
        if getattr(obj, name) != value:
            setattr(obj, name, value)
            changed.append(name)

    for name, value in cleaned.items():
        put(name, value)
    if obj.budget_period == BudgetPeriod.FIXED:
        start, end = obj.budget_window_start, obj.budget_window_end
        if start is None or end is None:
            raise ValidationError(
                "a fixed budget period needs both budget_window_start and budget_window_end.", code="invalid"
            )
        if end <= start:
            raise ValidationError("budget_window_end must be after budget_window_start.", code="invalid")
    else:
        if cleaned.get("budget_window_start") is not None or cleaned.get("budget_window_end") is not None:
            raise ValidationError("a budget window is only used with budget_period 'fixed'.", code="invalid")
        # Leaving a fixed window for a calendar period: the old window means nothing now.
        put("budget_window_start", None)
        put("budget_window_end", None)
    return changed


def tenant_create(*, slug: str, name: str = "", **limits: Unpack[TenantLimits]) -> Tenant:
    """Create an active tenant. ``name`` defaults to the slug; ``limits`` as in TenantLimits.

    Raises ValidationError if the slug is not a valid slug (letters, digits, ``-``,
    ``_``; at most 64 chars) or is already taken, or if a limit is invalid.
    """
    slug = slug.strip()
    tenant = Tenant(slug=slug, name=name.strip() or slug)
    _apply_limits(tenant, _clean_limits(limits, allowed=TENANT_LIMIT_FIELDS))
    # full_clean covers the slug syntax, the lengths and the unique check.
    tenant.full_clean(exclude=["created_at"])
    try:
        with transaction.atomic():
            tenant.save()
    except IntegrityError:
        # Lost a race with a concurrent create of the same slug.
        raise ValidationError(f"tenant {slug!r} already exists.", code="unique") from None
    return tenant


def _normalize_models(models: Iterable[str] | None, *, what: str) -> list[str]:
    if models is None:
        return []
    if isinstance(models, str):
        raise ValidationError(f"{what} must be a list of model names, not a string.", code="invalid")
    result: list[str] = []
    for model in models:
        if not isinstance(model, str) or not model.strip():
            raise ValidationError(f"{what} must contain non-empty model names.", code="invalid")
        model = model.strip()
        if model not in result:
            result.append(model)
    return result


def apikey_create(
    *,
    tenant: Tenant,
    name: str = "",
    allowed_models: Sequence[str] | None = None,
    expires_at: datetime | None = None,
    **limits: Unpack[ApiKeyLimits],
) -> tuple[ApiKey, str]:
    """Create a key for ``tenant``; return ``(row, secret)``.

    The secret is returned once and never stored: the row holds only its prefix and
    HMAC digest. ``allowed_models`` None or empty: every model the pools serve.
    ``expires_at`` must be an aware datetime in the future. ``limits`` as in ApiKeyLimits
    (absent: unlimited, soft alerts at 80 %, monthly budget period).
    """
    models = _normalize_models(allowed_models, what="allowed models")
    cleaned = _clean_limits(limits, allowed=APIKEY_LIMIT_FIELDS)
    if expires_at is not None:
        if timezone.is_naive(expires_at):
            raise ValidationError("expires_at must be timezone-aware.", code="invalid")
        if expires_at <= timezone.now():
            raise ValidationError("expires_at is in the past.", code="invalid")
    if len(name) > 200:  # ApiKey.name max_length
        raise ValidationError("key name is too long (200 characters at most).", code="max_length")
    for _ in range(_PREFIX_ATTEMPTS):
        secret, prefix = generate_api_key()
        api_key = ApiKey(
            tenant=tenant,
            name=name,
            prefix=prefix,
            digest=key_digest(secret),
            allowed_models=models,
            expires_at=expires_at,
        )
        _apply_limits(api_key, cleaned)
        try:
            with transaction.atomic():
                api_key.save()
        except IntegrityError:
            if ApiKey.objects.filter(prefix=prefix).exists():
                continue  # prefix collision: draw another key
            raise
        return api_key, secret
    raise RuntimeError("could not allocate a unique API key prefix")  # pragma: no cover


def apikey_revoke(*, api_key: ApiKey) -> ApiKey:
    """Revoke ``api_key`` (idempotent: an already revoked key keeps its revocation time)."""
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key


def apikey_update(*, api_key: ApiKey, **limits: Unpack[ApiKeyLimits]) -> ApiKey:
    """Change some limits of ``api_key``: a given name is set (None: unlimited), the others kept.

    Validation as in ApiKeyLimits; the whole change is refused on any bad value. The row is
    locked while it is read and written, so concurrent updates cannot leave an inconsistent
    budget window. Saves only the changed fields; a real change is announced to every
    replica (post_save), which applies it on its next request. Returns ``api_key``, updated.
    """
    return _limits_update(api_key, _clean_limits(limits, allowed=APIKEY_LIMIT_FIELDS))


def tenant_update(*, tenant: Tenant, **limits: Unpack[TenantLimits]) -> Tenant:
    """Change some limits of ``tenant``, like :func:`apikey_update` (tenant-level limits only)."""
    return _limits_update(tenant, _clean_limits(limits, allowed=TENANT_LIMIT_FIELDS))


_Limited = TypeVar("_Limited", Tenant, ApiKey)


def _limits_update(obj: _Limited, cleaned: Mapping[str, Any]) -> _Limited:
    model: type[_Limited] = type(obj)
    with transaction.atomic():
        locked: _Limited = model._default_manager.select_for_update().get(pk=obj.pk)
        changed: list[str] = _apply_limits(locked, cleaned)
        if changed:
            locked.save(update_fields=changed)
    for name in {*changed, *cleaned}:
        setattr(obj, name, getattr(locked, name))
    return obj


# --- prices --------------------------------------------------------------------------


def price_set(
    *,
    model: str,
    input: Decimal | int | str,
    cached_input: Decimal | int | str,
    cache_write: Decimal | int | str,
    output: Decimal | int | str,
    reasoning: Decimal | int | str | None = None,
    effective_from: datetime | None = None,
) -> PriceVersion:
    """Add a price version for ``model``, in USD per million tokens; return it.

    Prices are >= 0 with at most 6 decimals (Decimal, int or str; floats are refused).
    ``reasoning`` None: reasoning tokens cost the output price. ``effective_from`` (aware;
    default now) is when the version starts to apply: a request is priced with the version
    of greatest ``effective_from <= its time``. Earlier versions are kept (usage records
    point at the one they were priced with); records already written keep their cost.
    Announced to every replica like a key change.
    """
    model = model.strip() if isinstance(model, str) else ""
    if not model:
        raise ValidationError("model must be a non-empty model name.", code="invalid")
    if len(model) > 200:
        raise ValidationError("model name is too long (200 characters at most).", code="max_length")

    def money(name: str, value: Any) -> Decimal:
        return _clean_decimal(name, value, max_digits=PRICE_MAX_DIGITS, places=PRICE_PLACES, positive=False)

    effective_from = timezone.now() if effective_from is None else _require_aware("effective_from", effective_from)
    price = PriceVersion(
        model=model,
        input=money("input", input),
        cached_input=money("cached_input", cached_input),
        cache_write=money("cache_write", cache_write),
        output=money("output", output),
        reasoning=money("reasoning", reasoning) if reasoning is not None else None,
        effective_from=effective_from,
    )
    price.save()
    return price


def _as_datetime(value: Any) -> datetime:
    # Journal and spooled events (gateway.metering.journal) may come back with ISO strings.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise ValidationError("usage event created_at must be a datetime.", code="invalid")
    if timezone.is_naive(value):
        raise ValidationError("usage event created_at must be timezone-aware.", code="invalid")
    return value


def _existing_ids(model: Any, ids: set[int]) -> set[int]:
    if not ids:
        return set()
    return set(model.objects.filter(pk__in=ids).values_list("pk", flat=True))


def _event_cost(event: Mapping[str, Any]) -> Decimal | None:
    raw = event.get("cost")
    if raw is None:
        return None
    try:
        cost = Decimal(str(raw)) if not isinstance(raw, Decimal) else raw
    except InvalidOperation:
        cost = Decimal("NaN")
    if not cost.is_finite() or cost < 0 or cost >= _COST_LIMIT:
        # A bad value must not make the whole batch fail forever: record the cost as unknown.
        logger.warning("usage event %s has an invalid cost; recorded as unknown", event.get("request_id"))
        return None
    return cost.quantize(_COST_QUANTUM)


def _price_table_for(events: Sequence[Mapping[str, Any]]) -> pricing.PriceTable:
    """The price versions of the models of the events that carry no ``cost`` key (one query)."""
    models = {str(e["model"]) for e in events if "cost" not in e}
    if not models:
        return pricing.PriceTable(())
    return pricing.PriceTable(
        pricing.Price.from_row(row) for row in PriceVersion.objects.filter(model__in=models).values()
    )


def usage_records_write(events: Sequence[Mapping[str, Any]]) -> int:
    """Insert usage rows; return how many were attempted (duplicates included).

    Idempotent on ``request_id``: a replayed event is ignored by the database. Keys
    or accounts deleted since the request are recorded as null; events of a deleted
    tenant are dropped with a warning (otherwise the whole batch would fail forever).
    Bumps ``ApiKey.last_used_at`` to the latest ``created_at`` per key with one
    queryset update, which fires no signal and so triggers no config reload.

    Cost contract: the data plane prices each request on the hot path (it needs the cost
    to settle budgets) and puts ``cost`` (a decimal string, or None when unknown) and
    ``price_version_id`` (int or None) in the event; they are stored as given (the cost
    rounded to 9 decimals; a price version deleted since is recorded as null). An event
    *without* a ``cost`` key (spooled before budgets existed, or written by another
    producer) is priced here with ``tenancy.pricing.cost_usd`` and the version effective
    at its ``created_at`` (one extra query per batch, only when such events exist).
    """
    if not events:
        return 0
    tenants = _existing_ids(Tenant, {int(e["tenant_id"]) for e in events})
    keys = _existing_ids(ApiKey, {int(e["api_key_id"]) for e in events if e.get("api_key_id") is not None})
    accounts = _existing_ids(UpstreamAccount, {int(e["account_id"]) for e in events if e.get("account_id") is not None})
    price_ids = _existing_ids(
        PriceVersion, {int(e["price_version_id"]) for e in events if e.get("price_version_id") is not None}
    )
    prices = _price_table_for(events)
    adapt = connection.ops.adapt_datetimefield_value
    adapt_decimal = connection.ops.adapt_decimalfield_value
    rows: list[tuple[Any, ...]] = []
    latest: dict[int, datetime] = {}
    dropped: list[str] = []
    attempts_field = UsageRecord._meta.get_field("attempts")
    for event in events:
        tenant_id = int(event["tenant_id"])
        if tenant_id not in tenants:
            dropped.append(str(event["request_id"]))
            continue
        key_id = event.get("api_key_id")
        key_id = int(key_id) if key_id is not None and int(key_id) in keys else None
        account_id = event.get("account_id")
        account_id = int(account_id) if account_id is not None and int(account_id) in accounts else None
        created_at = _as_datetime(event["created_at"])
        ttfb = event.get("ttfb_ms")
        if "cost" in event:
            cost = _event_cost(event)
            price_id = event.get("price_version_id")
            price_id = int(price_id) if price_id is not None and int(price_id) in price_ids else None
        else:
            price = prices.lookup(str(event["model"]), created_at)
            cost = pricing.cost_usd(event, price) if price is not None else None
            price_id = price.id if price is not None else None
        rows.append(
            (
                str(event["request_id"]),
                tenant_id,
                key_id,
                account_id,
                str(event["model"])[:200],
                int(event["status_code"]),
                str(event["outcome"]),
                bool(event.get("stream", False)),
                str(event.get("response_id") or "")[:128],
                float(event["latency_ms"]),
                float(ttfb) if ttfb is not None else None,
                adapt(created_at),
                *(event.get(name) for name in TOKEN_FIELDS),
                adapt_decimal(cost, COST_MAX_DIGITS, COST_PLACES) if cost is not None else None,
                price_id,
                attempts_field.get_db_prep_save(list(event.get("attempts") or ()), connection),
            )
        )
        if key_id is not None and (key_id not in latest or created_at > latest[key_id]):
            latest[key_id] = created_at
    if dropped:
        logger.warning("dropped %d usage events of deleted tenants: %s", len(dropped), ", ".join(dropped[:10]))
    if not rows:
        return 0
    with transaction.atomic():
        # Raw executemany: the ORM's bulk_create costs ~20x more CPU per row, and this
        # runs in the gateway process next to the hot path (see docs/performance.md).
        with connection.cursor() as cursor:
            cursor.executemany(_usage_insert_sql(), rows)
        items = sorted(latest.items())
        for start in range(0, len(items), _LAST_USED_CHUNK):
            _bump_last_used(dict(items[start : start + _LAST_USED_CHUNK]))
    return len(rows)


def _usage_insert_sql() -> str:
    """INSERT ... ON CONFLICT (request_id) DO NOTHING, valid for SQLite and PostgreSQL."""
    quote = connection.ops.quote_name
    columns = (
        "request_id",
        "tenant_id",
        "api_key_id",
        "account_id",
        "model",
        "status_code",
        "outcome",
        "stream",
        "response_id",
        "latency_ms",
        "ttfb_ms",
        "created_at",
        *TOKEN_FIELDS,
        "cost",
        "price_version_id",
        "attempts",
    )
    names = ", ".join(quote(column) for column in columns)
    marks = ", ".join(["%s"] * len(columns))
    return (
        f"INSERT INTO {quote(UsageRecord._meta.db_table)} ({names}) VALUES ({marks}) "
        f"ON CONFLICT ({quote('request_id')}) DO NOTHING"
    )


def _bump_last_used(latest: Mapping[int, datetime]) -> None:
    """One UPDATE moving each key's last_used_at forward (never backward) to ``latest[key]``."""
    whens = [
        When(Q(pk=key_id) & (Q(last_used_at__isnull=True) | Q(last_used_at__lt=moment)), then=Value(moment))
        for key_id, moment in latest.items()
    ]
    ApiKey.objects.filter(pk__in=list(latest)).filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=max(latest.values()))
    ).update(last_used_at=Case(*whens, default=F("last_used_at"), output_field=DateTimeField()))


# --- budget alerts ------------------------------------------------------------------

# Webhook delivery: a short timeout, since a Celery worker waits on it; retries are Celery's.
ALERT_WEBHOOK_TIMEOUT = 5.0


class AlertDeliveryError(Exception):
    """The webhook did not accept an alert (recorded in ``last_error``); worth a retry."""


def budget_alert_record(
    *,
    scope: str,
    scope_id: int,
    tenant_id: int,
    kind: str,
    period_start: datetime,
    period_end: datetime,
    metric: str | None = None,
    spent_usd: Decimal | str | None = None,
    spent_tokens: int | None = None,
    limit_usd: Decimal | str | None = None,
    limit_tokens: int | None = None,
) -> tuple[BudgetAlert, bool]:
    """Record that a budget threshold was crossed; return ``(alert, created)``.

    Idempotent per ``(scope, scope_id, period_start, kind)``: the first call of a period
    records the alert (with the spend at that time) and, when
    ``GATEWAY_ALERT_WEBHOOK_URL`` is set, queues its delivery after commit
    (``tenancy.tasks.budget_alert_deliver``); later calls return the existing row and do
    nothing, so callers may report a crossing as often as they see it.
    ``scope``: "key" (``scope_id`` = ApiKey id) or "tenant" (Tenant id); ``tenant_id`` is
    the tenant in both cases. ``kind``: "soft" | "hard". ``metric``: "usd" | "tokens", the
    budget that was crossed; None: the one with the larger ``spent / limit`` (the closest
    to, or furthest past, its limit), or "" when neither limit is given.
    """
    if scope not in BudgetScope.values:
        raise ValidationError(f"scope must be one of {', '.join(BudgetScope.values)} (got {scope!r}).")
    if kind not in BudgetAlertKind.values:
        raise ValidationError(f"kind must be one of {', '.join(BudgetAlertKind.values)} (got {kind!r}).")
    start = _require_aware("period_start", period_start)
    end = _require_aware("period_end", period_end)

    def money(value: Decimal | str | None) -> Decimal | None:
        return None if value is None else Decimal(str(value))

    if metric is None:
        metric = _crossed_metric(money(spent_usd), spent_tokens, money(limit_usd), limit_tokens)
    elif metric not in ("usd", "tokens"):
        raise ValidationError(f"metric must be usd or tokens (got {metric!r}).")

    with transaction.atomic():
        # get_or_create retries the read when a concurrent insert wins the unique constraint.
        alert, created = BudgetAlert.objects.get_or_create(
            scope=scope,
            scope_id=scope_id,
            period_start=start,
            kind=kind,
            defaults={
                "tenant_id": tenant_id,
                "metric": metric,
                "period_end": end,
                "spent_usd": money(spent_usd),
                "spent_tokens": spent_tokens,
                "limit_usd": money(limit_usd),
                "limit_tokens": limit_tokens,
            },
        )
        if created:
            logger.info("budget alert %s: %s %s budget of %s %s", alert.pk, kind, metric, scope, scope_id)
            if settings.GATEWAY_ALERT_WEBHOOK_URL:
                from tenancy.tasks import budget_alert_deliver as deliver_task

                alert_id = alert.pk
                transaction.on_commit(lambda: deliver_task.delay(alert_id), robust=True)
    return alert, created


def _crossed_metric(
    spent_usd: Decimal | None, spent_tokens: int | None, limit_usd: Decimal | None, limit_tokens: int | None
) -> str:
    ratios: list[tuple[Decimal, str]] = []
    if limit_usd:
        ratios.append(((spent_usd or Decimal(0)) / limit_usd, "usd"))
    if limit_tokens:
        ratios.append((Decimal(spent_tokens or 0) / limit_tokens, "tokens"))
    return max(ratios)[1] if ratios else ""


def budget_alert_payload(alert: BudgetAlert) -> dict[str, Any]:
    """The JSON body POSTed to the webhook (decimals as strings, datetimes as ISO 8601)."""
    key_prefix = None
    if alert.scope == BudgetScope.KEY:
        key_prefix = ApiKey.objects.filter(pk=alert.scope_id).values_list("prefix", flat=True).first()

    def text(value: Decimal | None) -> str | None:
        return None if value is None else f"{value.normalize():f}"  # 8.500000000 -> "8.5"

    return {
        "type": "budget.alert",
        "id": alert.pk,
        "kind": alert.kind,
        "metric": alert.metric,
        "scope": alert.scope,
        "scope_id": alert.scope_id,
        "tenant": alert.tenant.slug,
        "api_key_prefix": key_prefix,
        "period_start": alert.period_start.isoformat(),
        "period_end": alert.period_end.isoformat(),
        "spent_usd": text(alert.spent_usd),
        "spent_tokens": alert.spent_tokens,
        "limit_usd": text(alert.limit_usd),
        "limit_tokens": alert.limit_tokens,
        "created_at": alert.created_at.isoformat(),
    }


def budget_alert_deliver(*, alert: BudgetAlert, url: str, timeout: float = ALERT_WEBHOOK_TIMEOUT) -> bool:
    """POST ``alert`` as JSON to ``url``; return False if it was delivered already.

    A 2xx answer records ``delivered_at``; anything else records ``last_error`` (status or
    exception class, never the URL, which may embed a token) and raises AlertDeliveryError.
    ``attempts`` counts every try.
    """
    if alert.delivered_at is not None:
        return False
    error = ""
    try:
        response = httpx.post(url, json=budget_alert_payload(alert), timeout=timeout, follow_redirects=False)
        if not 200 <= response.status_code < 300:
            error = f"webhook answered HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        # Exception texts can quote the URL; keep the class and the host only.
        error = f"{type(exc).__name__} talking to {urlsplit(url).hostname or 'the webhook'}"
    now = timezone.now()
    if error:
        BudgetAlert.objects.filter(pk=alert.pk).update(attempts=F("attempts") + 1, last_error=error[:1000])
        alert.last_error = error[:1000]
        logger.warning("budget alert %s not delivered: %s", alert.pk, error)
        raise AlertDeliveryError(error)
    BudgetAlert.objects.filter(pk=alert.pk).update(attempts=F("attempts") + 1, delivered_at=now, last_error="")
    alert.delivered_at = now
    alert.last_error = ""
    return True
