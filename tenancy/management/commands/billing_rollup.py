"""python manage.py billing_rollup [--from ISO] [--to ISO] [--model MODEL]

Recomputes the billing rollups synchronously, with the same service as the Celery tasks
(tenancy.services.rollups). Without --from/--to: what the periodic task does (every record
inserted since the last run). With them: the buckets of [from, to) (no offset: UTC; --to
defaults to now), only MODEL's rows with --model.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from tenancy.services import rollups


def parse_instant(flag: str, raw: str) -> datetime:
    """An ISO date or datetime of a command flag (no offset: UTC)."""
    try:
        moment = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise CommandError(f"{flag} must be an ISO date or datetime such as 2026-02-01T00:00Z (got {raw!r}).") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


class Command(BaseCommand):
    help = "Recompute the billing rollups now: recent records, or the buckets of [--from, --to)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--from", dest="start", default=None, metavar="ISO", help="Start (inclusive).")
        parser.add_argument("--to", dest="end", default=None, metavar="ISO", help="End (exclusive; default now).")
        parser.add_argument("--model", default=None, help="Only this model's rows (re-rating).")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["start"] is None:
            if options["end"] is not None or options["model"] is not None:
                raise CommandError("--to and --model need --from.")
            result = rollups.rollup_recent()
            self.stdout.write(f"Rolled up {result.records} records: {result.rows} bucket rows, {result.days} day rows.")
            return
        start = parse_instant("--from", options["start"])
        end = parse_instant("--to", options["end"]) if options["end"] is not None else timezone.now()
        if end <= start:
            raise CommandError("--to must be after --from.")
        result, seconds = rollups.rollup_timed(start, end, options["model"])
        self.stdout.write(
            f"Rolled up {result.records} records of {start.isoformat()} .. {end.isoformat()} in {seconds:.2f} s: "
            f"{result.rows} bucket rows, {result.days} day rows."
        )
