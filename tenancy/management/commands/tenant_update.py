"""python manage.py tenant_update SLUG [limit flags]

Changes the given limits of a tenant (they apply to all its keys together, on top of each
key's own limits); ``none`` clears a limit. Without flags, shows the current limits.
Every gateway replica applies a change on its next request.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from tenancy.management.limit_options import add_limit_arguments, limits_update_and_show
from tenancy.management.lookups import tenant_or_exit


class Command(BaseCommand):
    help = "Change a tenant's limits, or show them (no flags); replicas apply a change on their next request."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug", metavar="SLUG")
        add_limit_arguments(parser, key_level=False, clearable=True)

    def handle(self, *args: Any, **options: Any) -> None:
        limits_update_and_show(self, tenant_or_exit(options["slug"]), options)
