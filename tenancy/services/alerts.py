"""Budget alerts: record a crossed threshold once per period, deliver it to the webhook.

:func:`budget_alert_record` queues the delivery by its Celery task name
(:data:`BUDGET_ALERT_DELIVER_TASK`, defined in tenancy/tasks.py, which calls back
:func:`budget_alert_deliver`), so this module does not import the tasks. Every process
registers the task (tenancy/apps.py), so ``CELERY_TASK_ALWAYS_EAGER`` runs it in place.

The webhook is an outbound HTTP call, so it goes through the one outbound-HTTP seam,
``accounts.upstream.client.UpstreamClient``, and its failures are that seam's
``UpstreamError`` tree. Like upstream calls it follows no redirect and ignores proxy
environment variables.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import orjson
from celery import current_app
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from accounts.upstream.client import UpstreamClient, UpstreamError, UpstreamReply
from tenancy.models import ApiKey, BudgetAlert, BudgetAlertKind, BudgetScope
from tenancy.services.limits import aware_datetime_require

logger = logging.getLogger(__name__)

# The Celery name of the delivery task (tenancy/tasks.py); queued messages carry it.
BUDGET_ALERT_DELIVER_TASK = "tenancy.tasks.budget_alert_deliver"

# Webhook delivery: a short timeout, since a Celery worker waits on it; retries are Celery's.
ALERT_WEBHOOK_TIMEOUT = 5.0

_HEADERS = {"content-type": "application/json", "accept": "*/*"}


class AlertDeliveryError(Exception):
    """The webhook did not accept an alert (recorded in ``last_error``); worth a retry."""


def budget_alert_record(
    *,
    scope: str,
    scope_id: int,
    tenant_id: int,
    kind: str,
    period_start: datetime,
    period_end: datetime,
    metric: str | None = None,
    spent_usd: Decimal | str | None = None,
    spent_tokens: int | None = None,
    limit_usd: Decimal | str | None = None,
    limit_tokens: int | None = None,
) -> tuple[BudgetAlert, bool]:
    """Record that a budget threshold was crossed; return ``(alert, created)``.

    Idempotent per ``(scope, scope_id, period_start, kind)``: the first call of a period
    records the alert (with the spend at that time) and, when
    ``GATEWAY_ALERT_WEBHOOK_URL`` is set, queues its delivery after commit
    (the task :data:`BUDGET_ALERT_DELIVER_TASK`); later calls return the existing row and do
    nothing, so callers may report a crossing as often as they see it.
    ``scope``: "key" (``scope_id`` = ApiKey id) or "tenant" (Tenant id); ``tenant_id`` is
    the tenant in both cases. ``kind``: "soft" | "hard". ``metric``: "usd" | "tokens", the
    budget that was crossed; None: the one with the larger ``spent / limit`` (the closest
    to, or furthest past, its limit), or "" when neither limit is given.
    """
    if scope not in BudgetScope.values:
        raise ValidationError(f"scope must be one of {', '.join(BudgetScope.values)} (got {scope!r}).")
    if kind not in BudgetAlertKind.values:
        raise ValidationError(f"kind must be one of {', '.join(BudgetAlertKind.values)} (got {kind!r}).")
    start = aware_datetime_require("period_start", period_start)
    end = aware_datetime_require("period_end", period_end)

    def money(value: Decimal | str | None) -> Decimal | None:
        return None if value is None else Decimal(str(value))

    if metric is None:
        metric = _crossed_metric(money(spent_usd), spent_tokens, money(limit_usd), limit_tokens)
    elif metric not in ("usd", "tokens"):
        raise ValidationError(f"metric must be usd or tokens (got {metric!r}).")

    with transaction.atomic():
        # get_or_create retries the read when a concurrent insert wins the unique constraint.
        alert, created = BudgetAlert.objects.get_or_create(
            scope=scope,
            scope_id=scope_id,
            period_start=start,
            kind=kind,
            defaults={
                "tenant_id": tenant_id,
                "metric": metric,
                "period_end": end,
                "spent_usd": money(spent_usd),
                "spent_tokens": spent_tokens,
                "limit_usd": money(limit_usd),
                "limit_tokens": limit_tokens,
            },
        )
        if created:
            logger.info("budget alert %s: %s %s budget of %s %s", alert.pk, kind, metric, scope, scope_id)
            if settings.GATEWAY_ALERT_WEBHOOK_URL:
                deliver = current_app.signature(BUDGET_ALERT_DELIVER_TASK, args=(alert.pk,))
                transaction.on_commit(deliver.delay, robust=True)
    return alert, created


def _crossed_metric(
    spent_usd: Decimal | None, spent_tokens: int | None, limit_usd: Decimal | None, limit_tokens: int | None
) -> str:
    ratios: list[tuple[Decimal, str]] = []
    if limit_usd:
        ratios.append(((spent_usd or Decimal(0)) / limit_usd, "usd"))
    if limit_tokens:
        ratios.append((Decimal(spent_tokens or 0) / limit_tokens, "tokens"))
    return max(ratios)[1] if ratios else ""


def budget_alert_payload(alert: BudgetAlert) -> dict[str, Any]:
    """The JSON body POSTed to the webhook (decimals as strings, datetimes as ISO 8601)."""
    key_prefix = None
    if alert.scope == BudgetScope.KEY:
        key_prefix = ApiKey.objects.filter(pk=alert.scope_id).values_list("prefix", flat=True).first()

    def text(value: Decimal | None) -> str | None:
        return None if value is None else f"{value.normalize():f}"  # 8.500000000 -> "8.5"

    return {
        "type": "budget.alert",
        "id": alert.pk,
        "kind": alert.kind,
        "metric": alert.metric,
        "scope": alert.scope,
        "scope_id": alert.scope_id,
        "tenant": alert.tenant.slug,
        "api_key_prefix": key_prefix,
        "period_start": alert.period_start.isoformat(),
        "period_end": alert.period_end.isoformat(),
        "spent_usd": text(alert.spent_usd),
        "spent_tokens": alert.spent_tokens,
        "limit_usd": text(alert.limit_usd),
        "limit_tokens": alert.limit_tokens,
        "created_at": alert.created_at.isoformat(),
    }


def budget_alert_deliver(*, alert: BudgetAlert, url: str, timeout: float = ALERT_WEBHOOK_TIMEOUT) -> bool:
    """POST ``alert`` as JSON to ``url``; return False if it was delivered already.

    A 2xx answer records ``delivered_at``; anything else records ``last_error`` (status or
    the seam's exception class, never the URL, which may embed a token) and raises
    AlertDeliveryError. ``attempts`` counts every try. Synchronous (for the Celery task):
    not to be called from an event loop's thread.
    """
    if alert.delivered_at is not None:
        return False
    error = ""
    try:
        reply = asyncio.run(_post(url, orjson.dumps(budget_alert_payload(alert)), timeout))
        if not 200 <= reply.status < 300:
            error = f"webhook answered HTTP {reply.status}"
    except UpstreamError as exc:
        # The seam's messages never quote the URL; name the host only.
        error = f"{type(exc).__name__} talking to {urlsplit(url).hostname or 'the webhook'}"
    now = timezone.now()
    if error:
        BudgetAlert.objects.filter(pk=alert.pk).update(attempts=F("attempts") + 1, last_error=error[:1000])
        alert.last_error = error[:1000]
        logger.warning("budget alert %s not delivered: %s", alert.pk, error)
        raise AlertDeliveryError(error)
    BudgetAlert.objects.filter(pk=alert.pk).update(attempts=F("attempts") + 1, delivered_at=now, last_error="")
    alert.delivered_at = now
    alert.last_error = ""
    return True


async def _post(url: str, body: bytes, timeout: float) -> UpstreamReply:
    client = UpstreamClient(
        transport=settings.GATEWAY_UPSTREAM_TRANSPORT, connect_timeout=timeout, read_timeout=timeout, max_connections=1
    )
    try:
        return await client.post(url, _HEADERS, body)
    finally:
        await client.aclose()
