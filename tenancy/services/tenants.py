"""Writes of tenants: create one, change its limits (which apply to all its keys together)."""

from __future__ import annotations

from typing import Unpack

from celery import current_app
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from accounts.infra.audit import audit_fields, audited_update
from tenancy.billing import time_zone_validate
from tenancy.models import Tenant
from tenancy.services.limits import TENANT_LIMIT_FIELDS, TenantLimits, limits_apply, limits_clean, limits_update
from tenancy.services.rollups import BILLING_DAYS_REBUILD_TASK

_AUDITED = ("slug", "name", "is_active", "time_zone", *sorted(TENANT_LIMIT_FIELDS))


def _time_zone_clean(value: str) -> str:
    try:
        return time_zone_validate(value)
    except ValueError as exc:
        raise ValidationError({"time_zone": str(exc)}, code="invalid") from None


def tenant_create(*, slug: str, name: str = "", time_zone: str = "UTC", **limits: Unpack[TenantLimits]) -> Tenant:
    """Create an active tenant. ``name`` defaults to the slug; ``limits`` as in TenantLimits;
    ``time_zone`` (IANA name, default UTC) is its reporting time zone (docs/billing.md).

    Raises ValidationError if the slug is not a valid slug (letters, digits, ``-``,
    ``_``; at most 64 chars) or is already taken, or if a limit is invalid.
    """
    slug = slug.strip()
    zone_name = _time_zone_clean(time_zone)
    tenant = Tenant(slug=slug, name=name.strip() or slug, time_zone=zone_name, rollup_time_zone=zone_name)
    limits_apply(tenant, limits_clean(limits, allowed=TENANT_LIMIT_FIELDS))
    # full_clean covers the slug syntax, the lengths and the unique check.
    tenant.full_clean(exclude=["created_at"])
    try:
        with transaction.atomic():
            tenant.save()
            audit_fields("tenant.create", tenant, _AUDITED, None, tenant_id=tenant.pk, label=tenant.slug)
    except IntegrityError:
        # Lost a race with a concurrent create of the same slug.
        raise ValidationError(f"tenant {slug!r} already exists.", code="unique") from None
    return tenant


def tenant_update(*, tenant: Tenant, **limits: Unpack[TenantLimits]) -> Tenant:
    """Change some limits of ``tenant``, like ``apikey_update`` (tenant-level limits only)."""
    return limits_update(tenant, limits_clean(limits, allowed=TENANT_LIMIT_FIELDS))


def tenant_details_set(
    *, tenant: Tenant, name: str | None = None, is_active: bool | None = None, time_zone: str | None = None
) -> Tenant:
    """Rename ``tenant`` and/or suspend (``is_active=False``: every key refused on the next
    request of every replica) or reactivate it, and/or change its reporting ``time_zone`` (its
    daily rollups are rebuilt in the new zone by the task ``billing_days_rebuild``, queued on
    commit); None keeps a value. Audited."""
    updates: dict[str, object] = {}
    if time_zone is not None and _time_zone_clean(time_zone) != tenant.time_zone:
        updates["time_zone"] = _time_zone_clean(time_zone)
    if name is not None:
        name = name.strip()
        if not name or len(name) > 200:
            raise ValidationError({"name": "a tenant name has 1 to 200 characters."}, code="invalid")
        updates["name"] = name
    if is_active is not None:
        updates["is_active"] = is_active
    # post_save announces a change to every replica
    changed = audited_update(
        tenant, updates, action="tenant.update", fields=_AUDITED, tenant_id=tenant.pk, label=tenant.slug
    )
    if "time_zone" in changed:
        rebuild = current_app.signature(BILLING_DAYS_REBUILD_TASK, args=(tenant.pk,))
        transaction.on_commit(rebuild.delay, robust=True)
    return tenant
