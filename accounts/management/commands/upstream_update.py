"""python manage.py upstream_update ACCOUNT_ID [--weight N] [--max-concurrency N|unlimited] [--priority N]
[--enable | --disable [--reason TEXT]] [--models a,b]

Changes only what is given, then prints the account's settings. The API key is never shown.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.management.refusals import account_or_exit, exit_on_refusal, whole_number_or_exit
from accounts.services import UNCHANGED, Unchanged, upstream_account_update

_UNLIMITED = ("unlimited", "none", "0")


class Command(BaseCommand):
    help = "Change an upstream account's weight, concurrency cap, fill-first priority, models or enabled switch."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("account_id", metavar="ACCOUNT_ID")
        parser.add_argument("--weight", default=None, help="Relative share of traffic (>= 1).")
        parser.add_argument(
            "--max-concurrency",
            dest="max_concurrency",
            default=None,
            help="Requests in flight at once per gateway process (>= 1), or 'unlimited'.",
        )
        parser.add_argument("--priority", default=None, help="Fill-first order: lower is used first.")
        parser.add_argument("--models", default=None, help="Comma-separated models the account serves (replaces).")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--enable", action="store_true", help="Enable (and re-admit) the account.")
        group.add_argument("--disable", action="store_true", help="Disable the account.")
        parser.add_argument("--reason", default="", help="Why it is disabled (with --disable).")

    def handle(self, *args: Any, **options: Any) -> None:
        account = account_or_exit(options["account_id"], "ACCOUNT_ID")
        if options["enable"] and options["disable"]:
            raise CommandError("use either --enable or --disable, not both.")
        if options["reason"] and not options["disable"]:
            raise CommandError("--reason goes with --disable.")
        max_concurrency: int | Unchanged | None = UNCHANGED
        if options["max_concurrency"] is not None:
            raw = str(options["max_concurrency"]).strip().lower()
            max_concurrency = None if raw in _UNLIMITED else whole_number_or_exit(raw, "--max-concurrency")
        models = None
        if options["models"] is not None:
            models = [m.strip() for m in str(options["models"]).split(",") if m.strip()]
            if not models:
                raise CommandError("--models needs at least one model name.")
        enabled = True if options["enable"] else False if options["disable"] else None
        weight = None if options["weight"] is None else whole_number_or_exit(options["weight"], "--weight")
        priority = None if options["priority"] is None else whole_number_or_exit(options["priority"], "--priority")
        with exit_on_refusal():
            account = upstream_account_update(
                account=account,
                weight=weight,
                max_concurrency=max_concurrency,
                priority=priority,
                models=models,
                enabled=enabled,
                disabled_reason=options["reason"],
            )
        cap = "unlimited" if account.max_concurrency is None else str(account.max_concurrency)
        status = (
            "enabled"
            if account.enabled
            else "disabled" + (f" ({account.disabled_reason})" if account.disabled_reason else "")
        )
        self.stdout.write(
            f"Account {account.pk} ({account.pool.name}): weight {account.weight}, max concurrency {cap}, "
            f"priority {account.priority}, models {', '.join(account.models)}, {status}."
        )
