"""Writes of tenants: create one, change its limits (which apply to all its keys together)."""

from __future__ import annotations

from typing import Unpack

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from accounts.infra.audit import audit_fields, audited_update
from tenancy.models import Tenant
from tenancy.services.limits import TENANT_LIMIT_FIELDS, TenantLimits, limits_apply, limits_clean, limits_update

_AUDITED = ("slug", "name", "is_active", *sorted(TENANT_LIMIT_FIELDS))


def tenant_create(*, slug: str, name: str = "", **limits: Unpack[TenantLimits]) -> Tenant:
    """Create an active tenant. ``name`` defaults to the slug; ``limits`` as in TenantLimits.

    Raises ValidationError if the slug is not a valid slug (letters, digits, ``-``,
    ``_``; at most 64 chars) or is already taken, or if a limit is invalid.
    """
    slug = slug.strip()
    tenant = Tenant(slug=slug, name=name.strip() or slug)
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


def tenant_details_set(*, tenant: Tenant, name: str | None = None, is_active: bool | None = None) -> Tenant:
    """Rename ``tenant`` and/or suspend (``is_active=False``: every key refused on the next
    request of every replica) or reactivate it; None keeps a value. Audited."""
    updates: dict[str, object] = {}
    if name is not None:
        name = name.strip()
        if not name or len(name) > 200:
            raise ValidationError({"name": "a tenant name has 1 to 200 characters."}, code="invalid")
        updates["name"] = name
    if is_active is not None:
        updates["is_active"] = is_active
    # post_save announces a change to every replica
    audited_update(tenant, updates, action="tenant.update", fields=_AUDITED, tenant_id=tenant.pk, label=tenant.slug)
    return tenant
