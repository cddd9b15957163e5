"""python manage.py apikey_update KEY [limit flags]

KEY is the key's visible prefix (sk-gw-XXXXXXXXXX) or the full key. Changes the given
limits and policy; ``none`` clears one (unlimited / unrestricted). Without flags, shows
the current ones. Every gateway replica applies a change on its next request.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from tenancy.management.limit_options import add_limit_arguments, describe_limits, limits_from_options
from tenancy.models import ApiKey
from tenancy.selectors import apikey_get_by_prefix
from tenancy.services.keys import apikey_update


class Command(BaseCommand):
    help = (
        "Change an API key's limits and policy: flags left out are kept, 'none' clears one "
        "(e.g. --rpm none, --allowed-ips none). Without flags, show them. "
        "Takes effect on the next request on every replica."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key", metavar="KEY", help="The key's 16-character prefix (the full key works too).")
        add_limit_arguments(parser, key_level=True, clearable=True)

    def handle(self, *args: Any, **options: Any) -> None:
        raw: str = options["key"].strip()
        try:
            api_key = apikey_get_by_prefix(raw)
        except ApiKey.DoesNotExist:
            # Echo only the first 16 characters: a full key may have been pasted.
            raise CommandError(f"no API key with prefix {raw[:16]!r}.") from None
        limits = limits_from_options(options, key_level=True, clearable=True)
        label = f"API key {api_key.prefix} of tenant {api_key.tenant.slug}"
        if limits:
            try:
                api_key = apikey_update(api_key=api_key, **limits)
            except ValidationError as exc:
                raise CommandError(" ".join(exc.messages)) from None
            self.stdout.write(f"Updated {label}: {', '.join(sorted(limits))}.")
        else:
            self.stdout.write(f"{label}:")
        if api_key.revoked_at is not None:
            self.stderr.write(f"warning: this key was revoked at {api_key.revoked_at.isoformat()}.")
        for line in describe_limits(api_key):
            self.stdout.write(line)
