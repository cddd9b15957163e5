"""python manage.py price_set MODEL --input X --cached-input X --cache-write X --output X
[--reasoning X] [--effective-from ISO-DATE] [--dry-run]

Adds a price version (USD per million tokens); earlier versions are kept. Requests are
priced with the version of greatest effective-from <= their time (tenancy.pricing). A version
effective in the past re-rates the billing rollups of its period (docs/billing.md);
--dry-run saves nothing and shows what that re-rating would change, per tenant.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.management.refusals import exit_on_refusal
from tenancy.pricing import Price
from tenancy.services.prices import price_set, price_validate
from tenancy.services.rollups import rerate_preview

_REQUIRED = (
    ("input", "--input"),
    ("cached_input", "--cached-input"),
    ("cache_write", "--cache-write"),
    ("output", "--output"),
)


class Command(BaseCommand):
    help = (
        "Add a price version for MODEL, in USD per million tokens. input_tokens include cached and "
        "cache-write tokens and output_tokens include reasoning tokens: each detail is billed at its own "
        "rate instead of the base one, never twice. Takes effect on every replica at --effective-from."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("model", metavar="MODEL", help="Model name as clients send it.")
        parser.add_argument("--input", default=None, metavar="X", help="Uncached input tokens (required).")
        parser.add_argument(
            "--cached-input", dest="cached_input", default=None, metavar="X", help="Cache-read input tokens (required)."
        )
        parser.add_argument(
            "--cache-write", dest="cache_write", default=None, metavar="X", help="Cache-write input tokens (required)."
        )
        parser.add_argument("--output", default=None, metavar="X", help="Output tokens (required).")
        parser.add_argument(
            "--reasoning", default=None, metavar="X", help="Reasoning tokens (default: the output price)."
        )
        parser.add_argument(
            "--effective-from",
            dest="effective_from",
            default=None,
            metavar="ISO-DATE",
            help="When the price starts to apply, e.g. 2026-02-01 (no offset: UTC; default: now).",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Save nothing; show the re-rating it would cause, per tenant."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        for dest, flag in _REQUIRED:
            if options[dest] is None or not str(options[dest]).strip():
                raise CommandError(f"{flag} is required: USD per million tokens, e.g. {flag} 0.15.")
        effective_from = None
        raw = options["effective_from"]
        if raw is not None:
            try:
                effective_from = datetime.fromisoformat(str(raw).strip())
            except ValueError:
                raise CommandError(
                    f"--effective-from must be an ISO date or datetime such as 2026-02-01 (got {raw!r})."
                ) from None
            if effective_from.tzinfo is None:
                effective_from = effective_from.replace(tzinfo=UTC)
        if options["dry_run"]:
            self._dry_run(options, effective_from)
            return
        with exit_on_refusal():
            price = price_set(
                model=options["model"],
                input=str(options["input"]),
                cached_input=str(options["cached_input"]),
                cache_write=str(options["cache_write"]),
                output=str(options["output"]),
                reasoning=str(options["reasoning"]) if options["reasoning"] is not None else None,
                effective_from=effective_from,
            )
        reasoning = f"{price.reasoning:f}" if price.reasoning is not None else "= output"
        self.stdout.write(
            f"Price version {price.pk} of {price.model} from {price.effective_from.isoformat()} (USD per 1M tokens): "
            f"input {price.input:f}, cached input {price.cached_input:f}, cache write {price.cache_write:f}, "
            f"output {price.output:f}, reasoning {reasoning}."
        )

    def _dry_run(self, options: dict[str, Any], effective_from: datetime | None) -> None:
        with exit_on_refusal():
            row = price_validate(
                model=options["model"],
                input=str(options["input"]),
                cached_input=str(options["cached_input"]),
                cache_write=str(options["cache_write"]),
                output=str(options["output"]),
                reasoning=str(options["reasoning"]) if options["reasoning"] is not None else None,
                effective_from=effective_from,
            )
        candidate = Price(
            id=0,
            model=row.model,
            input=row.input,
            cached_input=row.cached_input,
            cache_write=row.cache_write,
            output=row.output,
            reasoning=row.reasoning,
            effective_from=row.effective_from,
        )
        preview = rerate_preview(candidate)
        self.stdout.write(
            f"Dry run: nothing saved. Re-rating {preview['model']} from {preview['from']} to {preview['to']} "
            f"(data as of {preview['data_as_of'] or 'never'}):"
        )
        for tenant in preview["tenants"]:
            self.stdout.write(
                f"  {tenant['tenant']}: {tenant['current_cost_usd']} -> {tenant['new_cost_usd']} USD "
                f"({tenant['difference_usd']}), price versions {tenant['current_price_version_ids']} -> "
                f"{tenant['new_price_version_ids']}"
            )
        if not preview["tenants"]:
            self.stdout.write("  no usage of that model in that period.")
