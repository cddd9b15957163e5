"""Monthly statements: computed from the rollups while a month is open, frozen when it is closed.

A statement covers one calendar month in the tenant's time zone. Its line items are the
tenant's tokens per model, price version and billed token kind with their exact amounts
(tenancy.reports.statement_lines). Closing a month (:func:`statement_close`) stores them in an
immutable ``Statement``. Whatever changes a closed month afterwards (late records, re-rating)
is never written into it: the next statement carries the difference as adjustments, computed
as the month's figures now minus what was billed for it (its lines plus the adjustments already
carried by statements closed since).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.infra.audit import audit_change
from tenancy.billing import month_range, zone
from tenancy.models import Statement, Tenant
from tenancy.pricing import pusd_to_usd
from tenancy.reports import ReportError, line_key, month_of, statement_lines
from tenancy.services.rollups import billing_lock, data_as_of


def _month_bounds(tenant: Tenant, month: str) -> tuple[datetime, datetime]:
    try:
        year, number = month_of(month)
    except ReportError as exc:
        raise ValidationError({"month": str(exc)}, code="invalid") from None
    return month_range(year, number, zone(tenant.time_zone))


def statement_adjustments(tenant: Tenant, month: str) -> list[dict[str, Any]]:
    """What changed in the tenant's closed months before ``month`` since they were billed."""
    closed = list(Statement.objects.filter(tenant=tenant, month__lt=month).order_by("month"))
    carried: dict[int, dict[tuple[Any, ...], list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for statement in closed:
        for adjustment in statement.adjustments:
            sums = carried[adjustment["statement_id"]][line_key(adjustment)]
            sums[0] += adjustment["tokens"]
            sums[1] += adjustment["amount_pusd"] or 0
    adjustments = []
    for statement in closed:
        billed: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0])
        for line in statement.lines:
            billed[line_key(line)][0] += line["tokens"]
            billed[line_key(line)][1] += line["amount_pusd"] or 0
        for key, sums in carried[statement.pk].items():
            billed[key][0] += sums[0]
            billed[key][1] += sums[1]
        now: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0])
        for line in statement_lines(tenant, statement.period_start, statement.period_end)["lines"]:
            now[line_key(line)][0] += line["tokens"]
            now[line_key(line)][1] += line["amount_pusd"] or 0
        for key in sorted(set(billed) | set(now), key=lambda k: tuple((v is None, str(v)) for v in k)):
            tokens = now[key][0] - billed[key][0]
            amount = now[key][1] - billed[key][1]
            if tokens or amount:
                model, price_id, kind = key
                adjustments.append(
                    {
                        "statement_id": statement.pk,
                        "month": statement.month,
                        "model": model,
                        "price_version_id": price_id,
                        "kind": kind,
                        "tokens": tokens,
                        "amount_pusd": amount,
                        "amount_usd": str(pusd_to_usd(amount)),
                    }
                )
    return adjustments


def statement_compute(tenant: Tenant, month: str) -> dict[str, Any]:
    """The statement of ``month`` (YYYY-MM in the tenant's time zone) as it stands: the closed
    one if it was closed, else computed now (lines of the month, adjustments of earlier ones)."""
    stored = Statement.objects.filter(tenant=tenant, month=month).first()
    if stored is not None:
        return statement_as_dict(stored)
    start, end = _month_bounds(tenant, month)
    body = statement_lines(tenant, start, end)
    adjustments = statement_adjustments(tenant, month)
    return _shape(tenant, month, tenant.time_zone, start, end, body, adjustments, closed_at=None)


def statement_range(tenant: Tenant, start: datetime, end: datetime) -> dict[str, Any]:
    """An on-demand statement of any ``[start, end)`` (no adjustments: it closes nothing)."""
    body = statement_lines(tenant, start, end)
    return _shape(tenant, None, tenant.time_zone, start, end, body, [], closed_at=None)


def _shape(
    tenant: Tenant,
    month: str | None,
    time_zone: str,
    start: datetime,
    end: datetime,
    body: dict[str, Any],
    adjustments: list[dict[str, Any]],
    *,
    closed_at: datetime | None,
    statement_id: int | None = None,
    as_of: datetime | None = None,
) -> dict[str, Any]:
    adjusted = sum(item["amount_pusd"] for item in adjustments)
    total = body["totals"]["amount_pusd"] + adjusted
    as_of = as_of if closed_at is not None else data_as_of()
    return {
        "object": "statement",
        "id": statement_id,
        "tenant": tenant.slug,
        "month": month,
        "time_zone": time_zone,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "closed": closed_at is not None,
        "closed_at": closed_at.isoformat() if closed_at else None,
        "lines": body["lines"],
        "adjustments": adjustments,
        "totals": {
            **body["totals"],
            "adjustments_pusd": adjusted,
            "adjustments_usd": str(pusd_to_usd(adjusted)),
            "total_pusd": total,
            "total_usd": str(pusd_to_usd(total)),
        },
        "price_version_ids": body["price_version_ids"],
        "data_as_of": as_of.isoformat() if as_of else None,
    }


def statement_as_dict(statement: Statement) -> dict[str, Any]:
    return _shape(
        statement.tenant,
        statement.month,
        statement.time_zone,
        statement.period_start,
        statement.period_end,
        {"lines": statement.lines, "totals": statement.totals, "price_version_ids": statement.price_version_ids},
        statement.adjustments,
        closed_at=statement.closed_at,
        statement_id=statement.pk,
        as_of=statement.data_as_of,
    )


def statement_close(*, tenant: Tenant, month: str, now: datetime | None = None) -> Statement:
    """Close ``month`` of ``tenant``: store its statement, immutable from then on. Audited.

    Refused (ValidationError) while the month has not ended, while the rollups are not
    complete up to its end (roll up first), when it is already closed, or when a later month
    is (months close in order, so every correction lands on a later statement).
    """
    now = now or timezone.now()
    start, end = _month_bounds(tenant, month)
    if end > now:
        raise ValidationError({"month": f"{month} has not ended yet in {tenant.time_zone}."}, code="invalid")
    as_of = data_as_of()
    if as_of is None or as_of < end:
        raise ValidationError(
            {"month": f"the rollups are complete up to {as_of.isoformat() if as_of else 'never'}: roll up first."},
            code="invalid",
        )
    if Statement.objects.filter(tenant=tenant, month__gte=month).exists():
        raise ValidationError({"month": f"{month} or a later month is already closed."}, code="invalid")
    with billing_lock():  # no rollup changes the figures while they are read
        body = statement_lines(tenant, start, end)
        statement = Statement(
            tenant=tenant,
            month=month,
            time_zone=tenant.time_zone,
            period_start=start,
            period_end=end,
            data_as_of=as_of,
            lines=body["lines"],
            adjustments=statement_adjustments(tenant, month),
            totals=body["totals"],
            price_version_ids=body["price_version_ids"],
        )
        try:
            with transaction.atomic():
                statement.save()
        except IntegrityError:
            raise ValidationError({"month": f"{month} is already closed."}, code="unique") from None
        audit_change(
            "statement.close",
            target=statement,
            before=None,
            after={"month": month, "total_usd": str(pusd_to_usd(body["totals"]["amount_pusd"]))},
            tenant_id=tenant.pk,
            label=f"{tenant.slug} {month}",
        )
    return statement
