"""python manage.py route_set MODEL [--target POOL:UPSTREAM_MODEL ...] [--delete]

Without an option, prints MODEL's route. Targets are tried in the order given: the
first is the primary, later ones are fallbacks. The upstream model is split at the
first ':' only, so names like ``ft:gpt-4o:org:x`` work.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.management.refusals import exit_on_refusal
from accounts.models import ModelRoute
from accounts.services import model_route_delete, model_route_set


class Command(BaseCommand):
    help = (
        "Route a public model name to ordered (pool, upstream model) targets: "
        "--target POOL:UPSTREAM_MODEL, repeatable; --delete removes the route. Without an option, show it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("model", metavar="MODEL", help="The public model name clients send.")
        parser.add_argument(
            "--target",
            action="append",
            default=[],
            metavar="POOL:UPSTREAM_MODEL",
            help="A pool and the model name sent upstream; repeat for fallbacks, in order.",
        )
        parser.add_argument("--delete", action="store_true", help="Remove the route (the model is served by name).")

    def handle(self, *args: Any, **options: Any) -> None:
        model: str = options["model"]
        targets_raw: list[str] = options["target"]
        if options["delete"]:
            if targets_raw:
                raise CommandError("use either --target or --delete, not both.")
            if not model_route_delete(model=model):
                raise CommandError(f"model {model!r} has no route.")
            self.stdout.write(f"Route of {model} deleted: it is served by accounts listing {model} again.")
            return
        if targets_raw:
            targets: list[tuple[str, str]] = []
            for raw in targets_raw:
                pool, sep, upstream = raw.partition(":")
                if not sep or not pool.strip() or not upstream.strip():
                    raise CommandError(f"--target {raw!r}: expected POOL:UPSTREAM_MODEL, e.g. main:gpt-4o-2024-08-06.")
                targets.append((pool.strip(), upstream.strip()))
            with exit_on_refusal():
                model_route_set(model=model, targets=targets)
        route = ModelRoute.objects.filter(model=model.strip()).first()
        if route is None:
            self.stdout.write(f"{model} has no route: it is served by every pool with an account listing it.")
            return
        listed = ", ".join(
            f"{target.pool.name}:{target.upstream_model}"
            for target in route.targets.select_related("pool").order_by("position")
        )
        self.stdout.write(f"{route.model} -> {listed or 'no targets (answers 503)'}")
