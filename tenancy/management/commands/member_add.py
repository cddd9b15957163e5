"""python manage.py member_add TENANT_SLUG USERNAME --role owner|admin|viewer [--password-env VAR]

Creates the user if needed (its password from the environment variable VAR, else an unusable
one: such a user signs in through single sign-on or uses tokens) and gives it the role in the
tenant; an existing member's role is changed.
"""

from __future__ import annotations

import os
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.management.refusals import exit_on_refusal
from tenancy.management.lookups import tenant_or_exit
from tenancy.models import Role
from tenancy.services.members import member_add


class Command(BaseCommand):
    help = "Add a person to a tenant with a role (creating the user if needed)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("tenant", metavar="TENANT_SLUG")
        parser.add_argument("username", metavar="USERNAME")
        parser.add_argument("--role", required=True, choices=Role.values)
        parser.add_argument(
            "--password-env",
            dest="password_env",
            default=None,
            help="Environment variable holding a new user's password.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        tenant = tenant_or_exit(options["tenant"])
        password = None
        if options["password_env"]:
            password = os.environ.get(options["password_env"])
            if not password:
                raise CommandError(f"environment variable {options['password_env']} is not set or empty.")
        with exit_on_refusal():
            membership = member_add(
                tenant=tenant, username=options["username"], role=options["role"], password=password
            )
        self.stdout.write(f"{membership.user.get_username()} is {membership.role} of tenant {tenant.slug}.")
