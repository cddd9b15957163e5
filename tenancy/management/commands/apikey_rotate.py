"""python manage.py apikey_rotate KEY [--grace-seconds N]

Gives the key a new secret, printed alone on the last line (shown only once). The key keeps
its id, limits and usage; the old secret works for N more seconds (default 0: not at all),
on every gateway replica.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from accounts.management.refusals import exit_on_refusal, whole_number_or_exit
from tenancy.management.lookups import add_apikey_argument, apikey_or_exit
from tenancy.services.keys import apikey_rotate


class Command(BaseCommand):
    help = "Rotate an API key: a new secret (printed last), the old one valid for --grace-seconds."

    def add_arguments(self, parser: CommandParser) -> None:
        add_apikey_argument(parser)
        parser.add_argument("--grace-seconds", default="0", help="How long the old secret stays valid (default 0).")

    def handle(self, *args: Any, **options: Any) -> None:
        api_key = apikey_or_exit(options)
        grace = whole_number_or_exit(options["grace_seconds"], "--grace-seconds")
        old = api_key.prefix
        with exit_on_refusal():
            api_key, secret = apikey_rotate(api_key=api_key, grace_seconds=grace)
        until = api_key.previous_valid_until
        self.stdout.write(f"Rotated API key {old} -> {api_key.prefix} (id {api_key.pk}, tenant {api_key.tenant.slug}).")
        self.stdout.write(
            f"The old secret works until {until.isoformat()}." if until else "The old secret no longer works."
        )
        self.stdout.write(secret)
