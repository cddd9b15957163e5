"""python manage.py usage_seed --records N [--from ISO] [--hours H] [--tenants T] [--keys K]
[--models M] [--accounts A] [--seed S]

Inserts N synthetic usage records (tenancy.services.seed: COPY on PostgreSQL) spread over
[from, from + H hours), for measurements (docs/billing.md). Use a database of its own.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from tenancy.management.commands.billing_rollup import parse_instant
from tenancy.services.seed import SeedShape, usage_seed


class Command(BaseCommand):
    help = "Insert N synthetic usage records (COPY on PostgreSQL) for measurements."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--records", type=int, required=True)
        parser.add_argument("--from", dest="start", default=None, metavar="ISO", help="Default: 30 days ago.")
        parser.add_argument("--hours", type=float, default=30 * 24.0, help="Span of the records (default 720).")
        parser.add_argument("--tenants", type=int, default=20)
        parser.add_argument("--keys", type=int, default=10, help="Keys per tenant.")
        parser.add_argument("--models", type=int, default=4)
        parser.add_argument("--accounts", type=int, default=3)
        parser.add_argument("--seed", type=int, default=1, help="Random seed.")

    def handle(self, *args: Any, **options: Any) -> None:
        count = options["records"]
        if count < 1 or options["hours"] <= 0:
            raise CommandError("--records and --hours must be positive.")
        shape = SeedShape(options["tenants"], options["keys"], options["models"], options["accounts"])
        if min(shape.tenants, shape.keys_per_tenant, shape.models, shape.accounts) < 1:
            raise CommandError("--tenants, --keys, --models and --accounts must be at least 1.")
        span = timedelta(hours=options["hours"])
        start = parse_instant("--from", options["start"]) if options["start"] else timezone.now() - span
        began = time.perf_counter()
        usage_seed(records=count, start=start, span=span, shape=shape, seed=options["seed"])
        seconds = time.perf_counter() - began
        self.stdout.write(f"Seeded {count} usage records in {seconds:.1f} s ({count / seconds:,.0f}/s).")
