"""python manage.py pool_strategy POOL [weighted_round_robin|least_in_flight|fill_first]

Without a strategy, prints POOL's. A change applies to the running gateways without a restart.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from accounts.management.refusals import exit_on_refusal, pool_or_exit
from accounts.models import Pool
from accounts.services import pool_set_strategy


class Command(BaseCommand):
    help = "Show or set how a pool spreads traffic over its accounts: " + " | ".join(Pool.Strategy.values) + "."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("pool", metavar="POOL")
        parser.add_argument("strategy", metavar="STRATEGY", nargs="?", default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        pool = pool_or_exit(options["pool"])
        if options["strategy"] is not None:
            with exit_on_refusal():
                pool = pool_set_strategy(pool=pool, strategy=options["strategy"])
        self.stdout.write(f"Pool {pool.name} uses {pool.strategy}.")
