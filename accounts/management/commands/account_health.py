"""python manage.py account_health [POOL] [--limit N] | --reset ACCOUNT_ID

Prints each account's health now and its last transitions (newest first). With Redis
the state is the shared one; in embedded mode it is the last recorded transition.
``--reset`` re-admits an account on every gateway (cooldowns and failure counts cleared).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.management.refusals import account_or_exit, pool_or_exit
from accounts.selectors import account_health_overview
from accounts.services import account_health_reset


def _when(value: datetime | float | None) -> str:
    if value is None:
        return "-"
    moment = value if isinstance(value, datetime) else datetime.fromtimestamp(value, tz=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Command(BaseCommand):
    help = "Show upstream accounts' health and recent transitions, or re-admit one (--reset ACCOUNT_ID)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("pool", metavar="POOL", nargs="?", default=None)
        parser.add_argument("--limit", type=int, default=5, help="Transitions shown per account (default 5).")
        parser.add_argument("--reset", metavar="ACCOUNT_ID", default=None, help="Re-admit this account.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["reset"] is not None:
            account = account_or_exit(options["reset"], "--reset")
            transition = account_health_reset(account=account)
            if transition is None:
                self.stdout.write(f"Account {account.pk} was not unhealthy; its counters are cleared.")
            else:
                self.stdout.write(f"Account {account.pk} re-admitted (was {transition.from_state}).")
            return
        pool = options["pool"]
        if pool is not None:
            pool_or_exit(pool)
        if options["limit"] < 0:
            raise CommandError("--limit must be 0 or more.")
        rows = account_health_overview(pool_name=pool, limit=options["limit"])
        if not rows:
            self.stdout.write("No upstream accounts.")
            return
        for row in rows:
            label = f"{row['id']}" + (f" {row['name']}" if row["name"] else "")
            if not row["enabled"]:
                reason = f": {row['disabled_reason']}" if row["disabled_reason"] else ""
                state = f"disabled by operator{reason}"
            else:
                state = row["state"]
                if row["until"] is not None:
                    state += f" until {_when(row['until'])}"
                if row["state"] != "healthy" and row["reason"]:
                    state += f" ({row['reason']})"
            self.stdout.write(f"[{row['pool_name']}] account {label}: {state}")
            for t in row["transitions"]:
                self.stdout.write(f"    {_when(t.at)}  {t.from_state} -> {t.to_state}: {t.reason}")
