"""python manage.py upstream_add POOL --base-url URL [--api-key KEY] [--models m1,m2] [--weight N] [--name NAME]

Creates POOL if missing. The gateway calls ``{base-url}/responses``. The API key is
stored encrypted and never printed.
"""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from accounts.management.refusals import exit_on_refusal, whole_number_or_exit
from accounts.services import pool_get_or_create, upstream_account_create


class Command(BaseCommand):
    help = "Add an upstream account (an OpenAI-compatible Responses API base URL) to a pool, creating the pool."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("pool", metavar="POOL", help="Pool name (a slug); created if missing.")
        parser.add_argument(
            "--base-url", dest="base_url", default=None, help="API base, e.g. https://api.openai.com/v1 (required)."
        )
        parser.add_argument(
            "--api-key", dest="api_key", default=None, help="Upstream API key; '-' reads it from stdin. Never echoed."
        )
        parser.add_argument("--models", default="", help="Comma-separated models this account serves (required).")
        parser.add_argument("--weight", default="1", help="Relative share of traffic among accounts (>= 1).")
        parser.add_argument("--name", default="", help="A label for the account.")

    def handle(self, *args: Any, **options: Any) -> None:
        base_url = options["base_url"]
        if not base_url:
            raise CommandError("--base-url is required, e.g. --base-url https://api.openai.com/v1.")
        models = [m.strip() for m in str(options["models"] or "").split(",") if m.strip()]
        if not models:
            raise CommandError("--models is required: the comma-separated models this account serves.")
        weight = whole_number_or_exit(options["weight"], "--weight")
        api_key = options["api_key"]
        if api_key == "-":
            api_key = sys.stdin.readline().strip()
        # One transaction: a rejected account does not leave a new empty pool behind.
        # (Service messages never contain the credential.)
        with exit_on_refusal(), transaction.atomic():
            pool = pool_get_or_create(name=options["pool"])
            account = upstream_account_create(
                pool=pool, base_url=base_url, api_key=api_key, models=models, weight=weight, name=options["name"]
            )
        credential = "stored encrypted" if account.credential_encrypted else "none"
        self.stdout.write(
            f"Added upstream account {account.pk} to pool {pool.name}: {account.base_url}/responses "
            f"for {', '.join(account.models)} (weight {account.weight}, credential {credential})."
        )
