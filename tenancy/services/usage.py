"""The batch insert of usage records, the one write of every metering path (gateway.metering).

Not config: rows are written with raw SQL and fire no signal, so nothing is announced to
the replicas.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models import Case, DateTimeField, F, Q, Value, When
from django.utils import timezone

from accounts.models import UpstreamAccount
from tenancy import pricing
from tenancy.models import COST_MAX_DIGITS, COST_PLACES, ApiKey, PriceVersion, Tenant, UsageRecord
from tenancy.pricing import TOKEN_FIELDS

logger = logging.getLogger(__name__)

# Keys per UPDATE in usage_records_write: each key costs a few SQL parameters and
# SQLite caps the parameter count per statement.
_LAST_USED_CHUNK = 200
_COST_QUANTUM = Decimal(1).scaleb(-COST_PLACES)
_COST_LIMIT = Decimal(10) ** (COST_MAX_DIGITS - COST_PLACES)  # what UsageRecord.cost can hold


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
    """INSERT ... ON CONFLICT DO NOTHING, valid for SQLite and PostgreSQL.

    No conflict target: on PostgreSQL the usage table is partitioned (migration 0008) and its
    unique key is ``(request_id, created_at)``; a replayed event carries both unchanged."""
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
    return f"INSERT INTO {quote(UsageRecord._meta.db_table)} ({names}) VALUES ({marks}) ON CONFLICT DO NOTHING"


def _bump_last_used(latest: Mapping[int, datetime]) -> None:
    """One UPDATE moving each key's last_used_at forward (never backward) to ``latest[key]``."""
    whens = [
        When(Q(pk=key_id) & (Q(last_used_at__isnull=True) | Q(last_used_at__lt=moment)), then=Value(moment))
        for key_id, moment in latest.items()
    ]
    ApiKey.objects.filter(pk__in=list(latest)).filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=max(latest.values()))
    ).update(last_used_at=Case(*whens, default=F("last_used_at"), output_field=DateTimeField()))
