"""python manage.py tenant_create SLUG [--name NAME] [limit flags]

Limit flags (tenancy/management/limit_options.py): --rpm N --tpm N --concurrency N
--budget-usd X --budget-tokens N --budget-period day|week|month|fixed
--budget-window-start ISO --budget-window-end ISO --budget-soft-percent P
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from accounts.management.refusals import exit_on_refusal
from tenancy.management.limit_options import add_limit_arguments, describe_limits, limits_from_options
from tenancy.services.tenants import tenant_create


class Command(BaseCommand):
    help = (
        "Create a tenant, optionally with limits that apply to all its keys together. "
        "Exits non-zero with a one-line reason if the slug is invalid or taken, or a limit is malformed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug", help="URL-safe identifier: letters, digits, '-' and '_' (at most 64).")
        parser.add_argument("--name", default="", help="Display name (defaults to the slug).")
        add_limit_arguments(parser, key_level=False, clearable=False)

    def handle(self, *args: Any, **options: Any) -> None:
        limits = limits_from_options(options, key_level=False, clearable=False)
        with exit_on_refusal():
            tenant = tenant_create(slug=options["slug"], name=options["name"], **limits)
        self.stdout.write(f"Created tenant {tenant.slug} (id {tenant.pk}).")
        if limits:
            for line in describe_limits(tenant):
                self.stdout.write(line)
