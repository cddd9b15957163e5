"""python manage.py tenant_update SLUG [limit flags]

Changes the given limits of a tenant (they apply to all its keys together, on top of each
key's own limits); ``none`` clears a limit. Without flags, shows the current limits.
Every gateway replica applies a change on its next request.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from tenancy.management.limit_options import add_limit_arguments, describe_limits, limits_from_options
from tenancy.models import Tenant
from tenancy.selectors import tenant_get_by_slug
from tenancy.services.tenants import tenant_update


class Command(BaseCommand):
    help = (
        "Change a tenant's limits: flags left out are kept, 'none' clears a limit (e.g. --rpm none). "
        "Without flags, show the current limits. Takes effect on the next request on every replica."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug", metavar="SLUG")
        add_limit_arguments(parser, key_level=False, clearable=True)

    def handle(self, *args: Any, **options: Any) -> None:
        slug: str = options["slug"]
        try:
            tenant = tenant_get_by_slug(slug)
        except Tenant.DoesNotExist:
            raise CommandError(f"unknown tenant {slug!r}.") from None
        limits = limits_from_options(options, key_level=False, clearable=True)
        if limits:
            try:
                tenant = tenant_update(tenant=tenant, **limits)
            except ValidationError as exc:
                raise CommandError(" ".join(exc.messages)) from None
            self.stdout.write(f"Updated tenant {tenant.slug}: {', '.join(sorted(limits))}.")
        else:
            self.stdout.write(f"Tenant {tenant.slug}:")
        for line in describe_limits(tenant):
            self.stdout.write(line)
