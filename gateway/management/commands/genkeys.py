"""Print, or write to a new private file, fresh SECRET_KEY and GATEWAY_ENCRYPTION_KEY lines."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.crypto import generate_encryption_key
from gateway.conf.files import write_private_file


class Command(BaseCommand):
    help = (
        "Print new SECRET_KEY and GATEWAY_ENCRYPTION_KEY lines (KEY=value) for a .env file, "
        "or write them to a new file readable by its owner only (--output)."
    )
    # Must run exactly when those settings are missing or broken.
    requires_system_checks = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--output", type=Path, help="write a new file (mode 0600) instead of printing")

    def handle(self, *args: Any, **options: Any) -> None:
        lines = f"SECRET_KEY={secrets.token_urlsafe(50)}\nGATEWAY_ENCRYPTION_KEY={generate_encryption_key()}\n"
        if options["output"] is None:
            self.stdout.write(lines, ending="")
            return
        try:
            write_private_file(options["output"], lines)
        except OSError as error:
            raise CommandError(str(error)) from error
        self.stdout.write(f"wrote {options['output']} (readable by its owner only)")
