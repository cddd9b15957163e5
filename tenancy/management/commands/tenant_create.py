"""python manage.py tenant_create SLUG [--name NAME]"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from tenancy.services import tenant_create


class Command(BaseCommand):
    help = "Create a tenant. Exits non-zero with a one-line reason if the slug is invalid or taken."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug", help="URL-safe identifier: letters, digits, '-' and '_' (at most 64).")
        parser.add_argument("--name", default="", help="Display name (defaults to the slug).")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            tenant = tenant_create(slug=options["slug"], name=options["name"])
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        self.stdout.write(f"Created tenant {tenant.slug} (id {tenant.pk}).")
