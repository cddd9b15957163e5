"""python manage.py apikey_update KEY [limit flags]

KEY is the key's visible prefix (sk-gw-XXXXXXXXXX) or the full key. Changes the given
limits and policy; ``none`` clears one (unlimited / unrestricted). Without flags, shows
the current ones. Every gateway replica applies a change on its next request.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from tenancy.management.limit_options import add_limit_arguments, limits_update_and_show
from tenancy.management.lookups import add_apikey_argument, apikey_or_exit


class Command(BaseCommand):
    help = "Change an API key's limits and policy, or show them (no flags); replicas apply it on their next request."

    def add_arguments(self, parser: CommandParser) -> None:
        add_apikey_argument(parser)
        add_limit_arguments(parser, key_level=True, clearable=True)

    def handle(self, *args: Any, **options: Any) -> None:
        limits_update_and_show(self, apikey_or_exit(options), options)
