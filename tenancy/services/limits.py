"""The limits of tenants and keys, and the cleaning of limit and money values.

:func:`limits_clean` validates and normalizes each given limit on its own; :func:`limits_apply`
sets them on a row and enforces the budget-window rules between them; :func:`limits_update`
does both on a locked row and saves what changed. The value cleaners raise ValidationError
with a sentence naming the field; prices and alerts reuse them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TypedDict, TypeVar

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from accounts.infra.audit import audit_change, audit_snapshot
from tenancy.models import BUDGET_USD_MAX_DIGITS, BUDGET_USD_PLACES, ApiKey, BudgetPeriod, Tenant

# Upper bounds of the limit columns (PositiveIntegerField / PositiveBigIntegerField).
_INT_MAX = 2**31 - 1
_BIGINT_MAX = 2**63 - 1
# Longest entry of a names list (reasoning efforts, tools).
_NAME_MAX = 64


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
    # The stateful policy: a tenant's is on or off; a key's None follows its tenant.
    stateful: bool | None
    # Tenants only: retention of stored responses and conversations in days (None: the default).
    stored_ttl_days: int | None


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
APIKEY_LIMIT_FIELDS: frozenset[str] = frozenset(ApiKeyLimits.__optional_keys__) - {"stored_ttl_days"}
_INT_LIMITS: dict[str, int] = {
    "rpm": _INT_MAX,
    "tpm": _BIGINT_MAX,
    "concurrency": _INT_MAX,
    "budget_tokens": _BIGINT_MAX,
    "max_output_tokens": _INT_MAX,
    "stored_ttl_days": 36_500,
}


def decimal_clean(name: str, value: Any, *, max_digits: int, places: int, positive: bool) -> Decimal:
    """A finite Decimal >= 0 (> 0 if ``positive``) with at most ``places`` decimals, fitting the column.

    Accepts Decimal, int or str; floats are refused (0.1 is not 0.1, and these are amounts of money).
    """
    if isinstance(value, bool | float) or not isinstance(value, Decimal | int | str):
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


def _aware_or_none(name: str, value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise ValidationError(f"{name} must be a datetime.", code="invalid")
    if timezone.is_naive(value):
        raise ValidationError(f"{name} must be timezone-aware.", code="invalid")
    return value


def aware_datetime_require(name: str, value: Any) -> datetime:
    """``value`` if it is a timezone-aware datetime; ValidationError naming ``name`` otherwise."""
    moment = _aware_or_none(name, value)
    if moment is None:
        raise ValidationError(f"{name} is required.", code="required")
    return moment


def _clean_positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _INT_LIMITS[name]:
        raise ValidationError(
            f"{name} must be a whole number from 1 to {_INT_LIMITS[name]} (got {value!r}).", code="invalid"
        )
    return value


def _strings(name: str, value: Any, what: str) -> list[str] | None:
    """None, or the stripped entries of a list of non-empty strings (a lone string is refused)."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValidationError(f"{name} must be a list of {what}, not {type(value).__name__}.", code="invalid")
    items = list(value)
    if not all(isinstance(item, str) and item.strip() for item in items):
        raise ValidationError(f"{name} must contain non-empty {what}.", code="invalid")
    return [item.strip() for item in items]


def _clean_names(name: str, value: Any) -> list[str] | None:
    names = _strings(name, value, "names")
    if names is None:
        return None
    for item in names:
        if len(item) > _NAME_MAX:
            raise ValidationError(
                f"{name} entry {item[:_NAME_MAX]!r}... is too long ({_NAME_MAX} characters at most).", code="invalid"
            )
    return list(dict.fromkeys(item.lower() for item in names))


def _clean_cidrs(value: Any) -> list[str] | None:
    items = _strings("allowed_ips", value, "addresses or CIDR networks")
    if items is None:
        return None
    if not items:
        raise ValidationError("allowed_ips must list at least one network (None allows any).", code="invalid")
    networks: list[str] = []
    for item in items:
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValidationError(f"allowed_ips: {item!r} is not an IP address or CIDR network.") from None
    return list(dict.fromkeys(networks))


def _clean_one(name: str, value: Any) -> Any:
    if name in _INT_LIMITS:
        return _clean_positive_int(name, value)
    if name == "budget_usd":
        if value is None:
            return None
        return decimal_clean(name, value, max_digits=BUDGET_USD_MAX_DIGITS, places=BUDGET_USD_PLACES, positive=True)
    if name == "budget_period":
        if value not in BudgetPeriod.values:
            raise ValidationError(
                f"budget_period must be one of {', '.join(BudgetPeriod.values)} (got {value!r}).", code="invalid"
            )
        return str(value)
    if name in ("budget_window_start", "budget_window_end"):
        return _aware_or_none(name, value)
    if name == "budget_soft_percent":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100):
            raise ValidationError(
                f"budget_soft_percent must be a whole number from 1 to 100 (got {value!r}).", code="invalid"
            )
        return value
    if name in ("reasoning_efforts", "allowed_tools"):
        return _clean_names(name, value)
    if name == "allowed_ips":
        return _clean_cidrs(value)
    if name == "stateful":
        if value is not None and not isinstance(value, bool):
            raise ValidationError(f"stateful must be true or false (got {value!r}).", code="invalid")
        return value
    raise AssertionError(f"limit {name} has no cleaner")  # a field added to the TypedDicts only


def limits_clean(values: Mapping[str, Any], *, allowed: frozenset[str]) -> dict[str, Any]:
    """Validate and normalize each given limit on its own (rules between them: :func:`limits_apply`).

    ``allowed``: TENANT_LIMIT_FIELDS or APIKEY_LIMIT_FIELDS; any other name is refused.
    """
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValidationError(f"unknown limit(s): {', '.join(unknown)}.", code="invalid")
    return {name: _clean_one(name, value) for name, value in values.items()}


def limits_apply(obj: Tenant | ApiKey, cleaned: Mapping[str, Any]) -> list[str]:
    """Set ``cleaned`` on ``obj`` (unsaved), enforce the budget window rules; return the changed fields."""
    changed: list[str] = []

    def put(name: str, value: Any) -> None:
        if getattr(obj, name) != value:
            setattr(obj, name, value)
            changed.append(name)

    if isinstance(obj, Tenant) and "stateful" in cleaned and cleaned["stateful"] is None:
        raise ValidationError("a tenant's stateful policy is on or off (only a key's may follow its tenant).")
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


# A key's own limit may not exceed its tenant's (the tenant's applies to all its keys together).
CAPPED_BY_TENANT = ("rpm", "tpm", "concurrency", "budget_tokens", "budget_usd")


def limits_within_tenant(api_key: ApiKey, names: Iterable[str] = CAPPED_BY_TENANT) -> None:
    """Refuse (ValidationError per field) a key limit among ``names`` above the same limit of its
    tenant. Only the limits being set are checked: a tenant limit an operator lowered later does
    not block changing a key's other settings (the lower limit applies anyway)."""
    tenant = api_key.tenant
    errors: dict[str, str] = {}
    for name in (n for n in CAPPED_BY_TENANT if n in set(names)):
        mine, cap = getattr(api_key, name), getattr(tenant, name)
        if mine is not None and cap is not None and mine > cap:
            errors[name] = f"{name} {mine} is above the tenant's own limit ({cap}); only an operator raises that."
    if errors:
        raise ValidationError(errors)


def audit_label(obj: Tenant | ApiKey) -> tuple[str, int]:
    """How the audit log names ``obj`` (a slug, a key's visible prefix: never a secret) and its tenant."""
    if isinstance(obj, Tenant):
        return obj.slug, obj.pk
    return obj.prefix, obj.tenant_id


_Limited = TypeVar("_Limited", Tenant, ApiKey)


def limits_update(obj: _Limited, cleaned: Mapping[str, Any]) -> _Limited:
    """Apply ``cleaned`` (from :func:`limits_clean`) to the row of ``obj``, locked; return ``obj``, updated.

    The row is locked while it is read and written, so concurrent updates cannot leave an
    inconsistent budget window. Saves only the changed fields (a real change is announced to
    every replica by post_save); the whole change is refused if the rules between limits fail.
    """
    model: type[_Limited] = type(obj)
    with transaction.atomic():
        locked: _Limited = model._default_manager.select_for_update().get(pk=obj.pk)
        fields = sorted(TENANT_LIMIT_FIELDS if isinstance(locked, Tenant) else APIKEY_LIMIT_FIELDS)
        before = audit_snapshot(locked, fields)
        changed: list[str] = limits_apply(locked, cleaned)
        if isinstance(locked, ApiKey):
            limits_within_tenant(locked, cleaned)
        if changed:
            locked.save(update_fields=changed)
            label, tenant_id = audit_label(locked)
            audit_change(
                f"{model._meta.model_name}.limits",
                target=locked,
                before=before,
                after=audit_snapshot(locked, fields),
                tenant_id=tenant_id,
                label=label,
            )
    for name in {*changed, *cleaned}:
        setattr(obj, name, getattr(locked, name))
    return obj
