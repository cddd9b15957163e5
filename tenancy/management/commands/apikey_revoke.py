"""python manage.py apikey_revoke PREFIX"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tenancy.models import ApiKey
from tenancy.selectors import apikey_get_by_prefix
from tenancy.services.keys import apikey_revoke


class Command(BaseCommand):
    help = "Revoke an API key by its prefix (sk-gw-XXXXXXXXXX). Revoking twice is harmless."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("prefix", metavar="PREFIX", help="The key's 16-character prefix (the full key works too).")

    def handle(self, *args: Any, **options: Any) -> None:
        raw: str = options["prefix"].strip()
        try:
            api_key = apikey_get_by_prefix(raw)
        except ApiKey.DoesNotExist:
            # Echo only the first 16 characters: a full key may have been pasted.
            raise CommandError(f"no API key with prefix {raw[:16]!r}.") from None
        already = api_key.revoked_at is not None
        api_key = apikey_revoke(api_key=api_key)
        assert api_key.revoked_at is not None
        when = api_key.revoked_at.isoformat()
        label = f"API key {api_key.prefix} of tenant {api_key.tenant.slug}"
        if already:
            self.stdout.write(f"{label} was already revoked at {when}.")
        else:
            self.stdout.write(f"Revoked {label} at {when}.")
