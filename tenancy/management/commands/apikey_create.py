"""python manage.py apikey_create TENANT_SLUG [--name NAME] [--models m1,m2] [--expires-in-days N] [limit flags]

Limit flags (tenancy/management/limit_options.py): --rpm N --tpm N --concurrency N
--max-output-tokens N --reasoning-efforts low,medium --allowed-tools function,web_search
--budget-usd X --budget-tokens N --budget-period day|week|month|fixed
--budget-window-start ISO --budget-window-end ISO --budget-soft-percent P --allowed-ips CIDR,...

Information lines first; the secret key alone on the LAST line of stdout, so scripts
can take it with ``| tail -n 1``. It is shown once and cannot be recovered.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from accounts.management.refusals import exit_on_refusal, whole_number_or_exit
from tenancy.management.limit_options import add_limit_arguments, describe_limits, limits_from_options
from tenancy.management.lookups import tenant_or_exit
from tenancy.services.keys import apikey_create


class Command(BaseCommand):
    help = "Create an API key for a tenant and print it (alone, on the last line). It is shown only once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("tenant", metavar="TENANT_SLUG")
        parser.add_argument("--name", default="", help="A label for the key.")
        parser.add_argument("--models", default="", help="Comma-separated models the key may use (default: all).")
        parser.add_argument(
            "--expires-in-days", dest="expires_in_days", default=None, help="Expire the key after N days."
        )
        add_limit_arguments(parser, key_level=True, clearable=False)

    def handle(self, *args: Any, **options: Any) -> None:
        tenant = tenant_or_exit(options["tenant"])
        models = [m.strip() for m in str(options["models"] or "").split(",") if m.strip()]
        expires_at = None
        if options["expires_in_days"] is not None:
            days = whole_number_or_exit(options["expires_in_days"], "--expires-in-days")
            if days < 1:
                raise CommandError("--expires-in-days must be at least 1.")
            expires_at = timezone.now() + timedelta(days=days)
        limits = limits_from_options(options, key_level=True, clearable=False)
        with exit_on_refusal():
            api_key, secret = apikey_create(
                tenant=tenant, name=options["name"], allowed_models=models, expires_at=expires_at, **limits
            )
        if not tenant.is_active:
            self.stderr.write(f"warning: tenant {tenant.slug} is inactive; the key works once it is reactivated.")
        self.stdout.write(f"Created API key {api_key.prefix} for tenant {tenant.slug} (id {api_key.pk}).")
        self.stdout.write(f"Models: {', '.join(api_key.allowed_models) if api_key.allowed_models else 'all'}")
        self.stdout.write(f"Expires: {api_key.expires_at.isoformat() if api_key.expires_at else 'never'}")
        for line in describe_limits(api_key):
            self.stdout.write(line)
        self.stdout.write("The key is shown only once; store it now:")
        self.stdout.write(secret)
