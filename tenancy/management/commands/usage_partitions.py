"""python manage.py usage_partitions [--dry-run]

PostgreSQL: creates the usage table's partitions of this month and the next two, and drops
the monthly partitions older than GATEWAY_USAGE_RETENTION_DAYS (tenancy.services.partitions).
The beat task does the same every hour.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from tenancy.services.partitions import is_partitioned, usage_partitions, usage_partitions_maintain


class Command(BaseCommand):
    help = "Create the coming usage partitions and drop those past the retention (PostgreSQL)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="Only say what would be done.")

    def handle(self, *args: Any, **options: Any) -> None:
        if not is_partitioned():
            self.stdout.write("The usage table is not partitioned (SQLite): nothing to do.")
            return
        done = usage_partitions_maintain(dry_run=options["dry_run"])
        verb = "Would create" if options["dry_run"] else "Created"
        self.stdout.write(f"{verb}: {', '.join(done['created']) or 'none'}.")
        verb = "Would drop" if options["dry_run"] else "Dropped"
        self.stdout.write(f"{verb}: {', '.join(done['dropped']) or 'none'}.")
        if done["failed"]:
            self.stderr.write(f"Failed: {', '.join(done['failed'])} (see the log).")
        self.stdout.write(f"Partitions: {', '.join(usage_partitions())}.")
