"""``python manage.py fake_upstream``: run the fake OpenAI Responses upstream.

A thin wrapper over :func:`gateway.devtools.fake_upstream.server.serve`; the flags are the same as
``python -m gateway.devtools.fake_upstream.server`` (see ``--help``).
"""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand

from gateway.devtools.fake_upstream import server as fake_upstream


class Command(BaseCommand):
    help = "Run the fake OpenAI Responses upstream (POST /v1/responses) for tests and benchmarks."
    requires_system_checks: list[str] = []  # the fake touches no model; start fast even if checks fail

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        fake_upstream.add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        namespace = argparse.Namespace(**options)
        fake_upstream.serve(options["host"], options["port"], **fake_upstream.options_from_args(namespace))
