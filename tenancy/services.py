"""Writes for tenants, API keys and usage records.

Every function validates its input and raises django.core.exceptions.ValidationError
with a human sentence on bad input, so commands and views can show it as is.
Config-relevant writes go through ``Model.save()`` so the post_save signals of
gateway.notify announce them to every replica; the usage path deliberately does not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import Case, DateTimeField, F, Q, Value, When
from django.utils import timezone

from accounts.models import UpstreamAccount
from tenancy.keys import generate_api_key, key_digest
from tenancy.models import ApiKey, Tenant, UsageRecord

logger = logging.getLogger(__name__)

# Prefix collisions (10 base62 chars) are astronomically rare; a few retries suffice.
_PREFIX_ATTEMPTS = 5
# Keys per UPDATE in usage_records_write: each key costs a few SQL parameters and
# SQLite caps the parameter count per statement.
_LAST_USED_CHUNK = 200

_TOKEN_FIELDS = (
    "input_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
)


def tenant_create(*, slug: str, name: str = "") -> Tenant:
    """Create an active tenant. ``name`` defaults to the slug.

    Raises ValidationError if the slug is not a valid slug (letters, digits, ``-``,
    ``_``; at most 64 chars) or is already taken.
    """
    slug = slug.strip()
    tenant = Tenant(slug=slug, name=name.strip() or slug)
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
) -> tuple[ApiKey, str]:
    """Create a key for ``tenant``; return ``(row, secret)``.

    The secret is returned once and never stored: the row holds only its prefix and
    HMAC digest. ``allowed_models`` None or empty: every model the pools serve.
    ``expires_at`` must be an aware datetime in the future.
    """
    models = _normalize_models(allowed_models, what="allowed models")
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


def _as_datetime(value: Any) -> datetime:
    # Spooled events (gateway.metering) may come back with ISO strings.
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


def usage_records_write(events: Sequence[Mapping[str, Any]]) -> int:
    """Insert usage rows; return how many were attempted (duplicates included).

    Idempotent on ``request_id``: a replayed event is ignored by the database. Keys
    or accounts deleted since the request are recorded as null; events of a deleted
    tenant are dropped with a warning (otherwise the whole batch would fail forever).
    Bumps ``ApiKey.last_used_at`` to the latest ``created_at`` per key with one
    queryset update, which fires no signal and so triggers no config reload.
    """
    if not events:
        return 0
    tenants = _existing_ids(Tenant, {int(e["tenant_id"]) for e in events})
    keys = _existing_ids(ApiKey, {int(e["api_key_id"]) for e in events if e.get("api_key_id") is not None})
    accounts = _existing_ids(UpstreamAccount, {int(e["account_id"]) for e in events if e.get("account_id") is not None})
    adapt = connection.ops.adapt_datetimefield_value
    rows: list[tuple[Any, ...]] = []
    latest: dict[int, datetime] = {}
    dropped: list[str] = []
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
                *(event.get(name) for name in _TOKEN_FIELDS),
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
        *_TOKEN_FIELDS,
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
