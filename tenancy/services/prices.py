"""Writes of prices: each change adds a version; earlier versions are kept for the records priced with them."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from celery import current_app
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from accounts.infra.audit import audit_change, audit_snapshot
from tenancy.models import PRICE_MAX_DIGITS, PRICE_PLACES, PriceVersion
from tenancy.services.limits import aware_datetime_require, decimal_clean
from tenancy.services.rollups import BILLING_RERATE_TASK, data_as_of


def price_set(
    *,
    model: str,
    input: Decimal | int | str,
    cached_input: Decimal | int | str,
    cache_write: Decimal | int | str,
    output: Decimal | int | str,
    reasoning: Decimal | int | str | None = None,
    effective_from: datetime | None = None,
) -> PriceVersion:
    """Add a price version for ``model``, in USD per million tokens; return it.

    Prices are >= 0 with at most 6 decimals (Decimal, int or str; floats are refused).
    ``reasoning`` None: reasoning tokens cost the output price. ``effective_from`` (aware;
    default now) is when the version starts to apply: a request is priced with the version
    of greatest ``effective_from <= its time``. Earlier versions are kept (usage records
    point at the one they were priced with); records already written keep their cost, and a
    version effective in the past re-rates the billing rollups of the period it applies to
    (the task ``billing_rerate``, queued on commit; see ``tenancy.services.rollups``).
    Announced to every replica like a key change.
    """
    price = price_validate(
        model=model,
        input=input,
        cached_input=cached_input,
        cache_write=cache_write,
        output=output,
        reasoning=reasoning,
        effective_from=effective_from,
    )
    with transaction.atomic():
        price.save()
        audit_change("price.set", target=price, before=None, after=audit_snapshot(price, _AUDITED), label=price.model)
        # Rollups already made past its start were priced without it: re-rate them.
        rolled_up_to = data_as_of()
        if rolled_up_to is not None and price.effective_from < rolled_up_to:
            rerate = current_app.signature(BILLING_RERATE_TASK, args=(price.pk,))
            transaction.on_commit(rerate.delay, robust=True)
    return price


_AUDITED = ("model", "input", "cached_input", "cache_write", "output", "reasoning", "effective_from")


def price_validate(
    *,
    model: str,
    input: Decimal | int | str,
    cached_input: Decimal | int | str,
    cache_write: Decimal | int | str,
    output: Decimal | int | str,
    reasoning: Decimal | int | str | None = None,
    effective_from: datetime | None = None,
) -> PriceVersion:
    """The unsaved price version :func:`price_set` would add (ValidationError on bad input)."""
    model = model.strip() if isinstance(model, str) else ""
    if not model:
        raise ValidationError("model must be a non-empty model name.", code="invalid")
    if len(model) > 200:
        raise ValidationError("model name is too long (200 characters at most).", code="max_length")

    def money(name: str, value: Any) -> Decimal:
        return decimal_clean(name, value, max_digits=PRICE_MAX_DIGITS, places=PRICE_PLACES, positive=False)

    if effective_from is None:
        effective_from = timezone.now()
    effective_from = aware_datetime_require("effective_from", effective_from)
    price = PriceVersion(
        model=model,
        input=money("input", input),
        cached_input=money("cached_input", cached_input),
        cache_write=money("cache_write", cache_write),
        output=money("output", output),
        reasoning=money("reasoning", reasoning) if reasoning is not None else None,
        effective_from=effective_from,
    )
    return price
