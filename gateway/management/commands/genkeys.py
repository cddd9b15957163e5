"""Print fresh SECRET_KEY and GATEWAY_ENCRYPTION_KEY lines for a .env file."""

from __future__ import annotations

import secrets
from typing import Any

from django.core.management.base import BaseCommand

from accounts.crypto import generate_encryption_key


class Command(BaseCommand):
    help = "Print new SECRET_KEY and GATEWAY_ENCRYPTION_KEY lines (KEY=value) for a .env file."
    # Must run exactly when those settings are missing or broken.
    requires_system_checks = []

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(f"SECRET_KEY={secrets.token_urlsafe(50)}")
        self.stdout.write(f"GATEWAY_ENCRYPTION_KEY={generate_encryption_key()}")
