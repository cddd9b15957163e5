"""python manage.py apikey_revoke KEY (the key's visible prefix, or the full key)"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from tenancy.management.lookups import add_apikey_argument, apikey_or_exit
from tenancy.services.keys import apikey_revoke


class Command(BaseCommand):
    help = "Revoke an API key by its prefix (sk-gw-XXXXXXXXXX). Revoking twice is harmless."

    def add_arguments(self, parser: CommandParser) -> None:
        add_apikey_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        api_key = apikey_or_exit(options)
        already = api_key.revoked_at is not None
        api_key = apikey_revoke(api_key=api_key)
        assert api_key.revoked_at is not None
        when = api_key.revoked_at.isoformat()
        label = f"API key {api_key.prefix} of tenant {api_key.tenant.slug}"
        if already:
            self.stdout.write(f"{label} was already revoked at {when}.")
        else:
            self.stdout.write(f"Revoked {label} at {when}.")
