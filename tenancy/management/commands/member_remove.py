"""python manage.py member_remove TENANT_SLUG USERNAME

Removes the membership (the user stays; the last owner cannot be removed).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.management.refusals import exit_on_refusal
from tenancy.management.lookups import tenant_or_exit
from tenancy.models import Membership
from tenancy.services.members import member_remove


class Command(BaseCommand):
    help = "Remove a person from a tenant."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("tenant", metavar="TENANT_SLUG")
        parser.add_argument("username", metavar="USERNAME")

    def handle(self, *args: Any, **options: Any) -> None:
        tenant = tenant_or_exit(options["tenant"])
        membership = Membership.objects.filter(tenant=tenant, user__username=options["username"]).first()
        if membership is None:
            raise CommandError(f"{options['username']!r} is not a member of tenant {tenant.slug}.")
        with exit_on_refusal():
            member_remove(membership=membership)
        self.stdout.write(f"{options['username']} is no longer a member of tenant {tenant.slug}.")
