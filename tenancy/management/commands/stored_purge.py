"""python manage.py stored_purge (--tenant SLUG | --key KEY)

Deletes the stored responses and conversations (the stateful policy) of a tenant, or of one of
its keys, on request; prints how many of each were deleted.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tenancy.management.lookups import apikey_or_exit, tenant_or_exit
from tenancy.services.stored import stored_objects_purge


class Command(BaseCommand):
    help = "Delete the stored responses and conversations of a tenant (--tenant) or of one key (--key)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", metavar="SLUG", default=None)
        parser.add_argument("--key", metavar="KEY", default=None, help="a key's visible prefix or the key itself")

    def handle(self, *args: Any, **options: Any) -> None:
        if (options["tenant"] is None) == (options["key"] is None):
            raise CommandError("give exactly one of --tenant SLUG or --key KEY.")
        if options["key"] is not None:
            api_key = apikey_or_exit(options)
            counts = stored_objects_purge(tenant=api_key.tenant, api_key=api_key)
        else:
            counts = stored_objects_purge(tenant=tenant_or_exit(options["tenant"]))
        self.stdout.write(f"Deleted {counts['responses']} responses and {counts['conversations']} conversations.")
