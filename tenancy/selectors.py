"""Reads of tenants and API keys that other layers depend on."""

from __future__ import annotations

from typing import Any

from django.db.models import F

from tenancy.keys import key_prefix
from tenancy.models import ApiKey, Tenant


def tenant_get_by_slug(slug: str) -> Tenant:
    """The tenant with ``slug``. Raises Tenant.DoesNotExist."""
    return Tenant.objects.get(slug=slug)


def apikey_get_by_prefix(prefix_or_key: str) -> ApiKey:
    """The key with this prefix (a full key is accepted too). Raises ApiKey.DoesNotExist."""
    prefix = key_prefix(prefix_or_key) or prefix_or_key
    return ApiKey.objects.select_related("tenant").get(prefix=prefix)


def apikeys_for_snapshot() -> list[dict[str, Any]]:
    """Every usable-or-expired key of an active tenant, as plain dicts, in one query.

    Keys: ``id, tenant_id, tenant_slug, prefix, digest, allowed_models, expires_at``.
    Revoked keys and keys of inactive tenants are left out. Expired keys are kept,
    with ``expires_at`` (aware datetime or None): the gateway checks expiry per
    request, since a snapshot outlives the moment a key expires.
    """
    rows = (
        ApiKey.objects.filter(revoked_at__isnull=True, tenant__is_active=True)
        .order_by("id")
        .values("id", "tenant_id", "prefix", "digest", "allowed_models", "expires_at", tenant_slug=F("tenant__slug"))
    )
    return [dict(row) for row in rows]
