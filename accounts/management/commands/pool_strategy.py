"""python manage.py pool_strategy POOL [weighted_round_robin|least_in_flight|fill_first]

Without a strategy, prints POOL's. A change applies to the running gateways without a restart.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.models import Pool
from accounts.services import pool_set_strategy


class Command(BaseCommand):
    help = "Show or set how a pool spreads traffic over its accounts: " + " | ".join(Pool.Strategy.values) + "."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("pool", metavar="POOL")
        parser.add_argument("strategy", metavar="STRATEGY", nargs="?", default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        name: str = options["pool"]
        try:
            pool = Pool.objects.get(name=name)
        except Pool.DoesNotExist:
            raise CommandError(f"unknown pool {name!r}: pools are created by `manage.py upstream_add`.") from None
        if options["strategy"] is not None:
            try:
                pool = pool_set_strategy(pool=pool, strategy=options["strategy"])
            except ValidationError as exc:
                raise CommandError(" ".join(exc.messages)) from None
        self.stdout.write(f"Pool {pool.name} uses {pool.strategy}.")
