"""python manage.py token_create USERNAME [--name N] [--expires-in-days N]

Creates a personal access token for the management API (/api/v1/). Information lines first;
the token alone on the LAST line of stdout (``| tail -n 1``). It is shown once.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.management.refusals import exit_on_refusal, whole_number_or_exit
from tenancy.services.tokens import access_token_create


class Command(BaseCommand):
    help = "Create a personal access token for the management API and print it (alone, on the last line)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username", metavar="USERNAME")
        parser.add_argument("--name", default="", help="A label for the token.")
        parser.add_argument("--expires-in-days", dest="expires_in_days", default=None, help="Expire after N days.")

    def handle(self, *args: Any, **options: Any) -> None:
        user = get_user_model().objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"no user {options['username']!r} (create one with createsuperuser or member_add).")
        days = None
        if options["expires_in_days"] is not None:
            days = whole_number_or_exit(options["expires_in_days"], "--expires-in-days")
        with exit_on_refusal():
            token, secret = access_token_create(user=user, name=options["name"], expires_in_days=days)
        self.stdout.write(f"Created token {token.prefix} for {user.get_username()} (id {token.pk}).")
        self.stdout.write(f"Expires: {token.expires_at.isoformat() if token.expires_at else 'never'}")
        self.stdout.write("The token is shown only once; store it now:")
        self.stdout.write(secret)
