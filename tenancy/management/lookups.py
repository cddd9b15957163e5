"""The tenant or API key a command names, found or refused with a one-line CommandError."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from tenancy.models import ApiKey, Tenant
from tenancy.selectors import apikey_get_by_prefix, tenant_get_by_slug


def add_apikey_argument(parser: CommandParser) -> None:
    """The positional KEY: a key's visible prefix (or the whole key); read by :func:`apikey_or_exit`."""
    parser.add_argument("key", metavar="KEY", help="The key's 16-character prefix (the full key works too).")


def apikey_or_exit(options: dict[str, Any]) -> ApiKey:
    """The key named by the KEY argument; CommandError if there is none."""
    raw = str(options["key"]).strip()
    try:
        return apikey_get_by_prefix(raw)
    except ApiKey.DoesNotExist:
        # Echo only the first 16 characters: a full key may have been pasted.
        raise CommandError(f"no API key with prefix {raw[:16]!r}.") from None


def tenant_or_exit(slug: str) -> Tenant:
    """The tenant ``slug``; CommandError (saying how to create it) if there is none."""
    try:
        return tenant_get_by_slug(slug)
    except Tenant.DoesNotExist:
        raise CommandError(f"unknown tenant {slug!r}: create it with `manage.py tenant_create {slug}`.") from None
