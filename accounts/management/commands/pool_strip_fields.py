"""python manage.py pool_strip_fields POOL [--fields a,b | --default]

Without an option, prints what POOL strips now.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.management.refusals import exit_on_refusal, pool_or_exit
from accounts.models import DEFAULT_STRIP_FIELDS
from accounts.services import pool_set_strip_fields


class Command(BaseCommand):
    help = (
        "Narrow the request fields a pool strips before forwarding (--fields a,b; '' strips nothing), "
        "or restore the default list (--default). Without an option, show the current list. "
        f"Default: {', '.join(DEFAULT_STRIP_FIELDS)}."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("pool", metavar="POOL")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--fields", default=None, help="Comma-separated subset of the default list.")
        group.add_argument("--default", action="store_true", help="Strip the default list again.")

    def handle(self, *args: Any, **options: Any) -> None:
        pool = pool_or_exit(options["pool"])
        if options["fields"] is not None and options["default"]:
            raise CommandError("use either --fields or --default, not both.")
        with exit_on_refusal():
            if options["default"]:
                pool = pool_set_strip_fields(pool=pool, fields=None)
            elif options["fields"] is not None:
                fields = [f.strip() for f in str(options["fields"]).split(",") if f.strip()]
                pool = pool_set_strip_fields(pool=pool, fields=fields)
        current = pool.effective_strip_fields()
        listed = ", ".join(current) if current else "nothing"
        origin = " (default)" if pool.strip_fields is None else ""
        self.stdout.write(f"Pool {pool.name} strips: {listed}{origin}.")
