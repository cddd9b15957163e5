"""Writes of tenants: create one, change its limits (which apply to all its keys together)."""

from __future__ import annotations

from typing import Unpack

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from tenancy.models import Tenant
from tenancy.services.limits import TENANT_LIMIT_FIELDS, TenantLimits, limits_apply, limits_clean, limits_update


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
    except IntegrityError:
        # Lost a race with a concurrent create of the same slug.
        raise ValidationError(f"tenant {slug!r} already exists.", code="unique") from None
    return tenant


def tenant_update(*, tenant: Tenant, **limits: Unpack[TenantLimits]) -> Tenant:
    """Change some limits of ``tenant``, like ``apikey_update`` (tenant-level limits only)."""
    return limits_update(tenant, limits_clean(limits, allowed=TENANT_LIMIT_FIELDS))
