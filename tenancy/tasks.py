"""Celery tasks of the demand side. They take ids and call services.

Services queue them by name (tenancy.services.alerts.BUDGET_ALERT_DELIVER_TASK) and never
import this module; tenancy/apps.py imports it so every process has the tasks registered.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from celery import Task, shared_task
from django.conf import settings
from django.db import DatabaseError

from tenancy.models import BudgetAlert, PriceVersion
from tenancy.selectors import stored_tenants_retention
from tenancy.services import alerts, partitions, rollups, stored
from tenancy.services.rollups import (
    BILLING_DAYS_REBUILD_TASK,
    BILLING_RERATE_TASK,
    BILLING_ROLLUP_PERIOD_TASK,
    BILLING_ROLLUP_RECENT_TASK,
    BILLING_ROLLUP_SWEEP_TASK,
    USAGE_PARTITIONS_MAINTAIN_TASK,
)

logger = logging.getLogger(__name__)


@shared_task(
    name=alerts.BUDGET_ALERT_DELIVER_TASK,
    autoretry_for=(alerts.AlertDeliveryError,),
    retry_backoff=5,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=8,
    ignore_result=True,
)
def budget_alert_deliver(alert_id: int) -> None:
    """POST budget alert ``alert_id`` to ``GATEWAY_ALERT_WEBHOOK_URL``, retried with backoff.

    Does nothing if the URL is unset, the alert is gone or already delivered.
    """
    url: str = settings.GATEWAY_ALERT_WEBHOOK_URL
    if not url:
        return
    alert = BudgetAlert.objects.select_related("tenant").filter(pk=alert_id).first()
    if alert is None:
        return
    alerts.budget_alert_deliver(alert=alert, url=url)


# Billing (tenancy.services.rollups). Every task recomputes from the records, so running one
# twice (a retry, a duplicate delivery) gives the same rows. Database errors are retried with
# an exponential backoff; each failure and retry is logged with the task's arguments.


class BillingTask(Task):
    autoretry_for = (DatabaseError,)
    retry_backoff = 10
    retry_backoff_max = 600
    retry_jitter = True
    max_retries = 6
    ignore_result = True

    def on_retry(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        logger.warning("billing task %s%s will be retried (id %s): %r", self.name, tuple(args), task_id, exc)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        logger.error("billing task %s%s failed (id %s): %r", self.name, tuple(args), task_id, exc)


def _log_result(what: str, result: rollups.RollupResult) -> None:
    logger.info("%s: %d records, %d bucket rows, %d day rows", what, result.records, result.rows, result.days)


@shared_task(base=BillingTask, name=BILLING_ROLLUP_RECENT_TASK)
def billing_rollup_recent() -> None:
    """Roll up every record inserted since the last run (the beat schedule runs it every few minutes)."""
    _log_result("billing rollup", rollups.rollup_recent())


@shared_task(base=BillingTask, name=BILLING_ROLLUP_SWEEP_TASK)
def billing_rollup_sweep() -> None:
    """Recompute the last GATEWAY_BILLING_SWEEP_HOURS hours (daily)."""
    _log_result("billing sweep", rollups.rollup_sweep())


@shared_task(base=BillingTask, name=BILLING_ROLLUP_PERIOD_TASK)
def billing_rollup_period(start: str, end: str, model: str | None = None) -> None:
    """Recompute ``[start, end)`` (ISO instants), only ``model``'s rows if given."""
    result = rollups.rollup_period(start=datetime.fromisoformat(start), end=datetime.fromisoformat(end), model=model)
    _log_result(f"billing rollup {start}..{end} {model or ''}", result)


@shared_task(base=BillingTask, name=BILLING_RERATE_TASK)
def billing_rerate(price_version_id: int) -> None:
    """Re-rate the period price version ``price_version_id`` applies to (added with a past date)."""
    price = PriceVersion.objects.filter(pk=price_version_id).first()
    if price is None:
        return
    start, end = rollups.rerate_range(price.model, price.effective_from, exclude_id=price.pk)
    _log_result(f"billing re-rate of {price.model}", rollups.rollup_period(start=start, end=end, model=price.model))


@shared_task(base=BillingTask, name=BILLING_DAYS_REBUILD_TASK)
def billing_days_rebuild(tenant_id: int) -> None:
    """Rebuild a tenant's daily rollups in its time zone (after the time zone changed)."""
    rows = rollups.rollup_days_rebuild(tenant_id=tenant_id)
    logger.info("billing days of tenant %s rebuilt: %d rows", tenant_id, rows)


@shared_task(base=BillingTask, name=USAGE_PARTITIONS_MAINTAIN_TASK)
def usage_partitions_maintain() -> None:
    """Create the coming months' usage partitions and drop those past the retention (PostgreSQL)."""
    done = partitions.usage_partitions_maintain()
    if done["created"] or done["dropped"]:
        logger.info("usage partitions: created %s, dropped %s", done["created"], done["dropped"])


@shared_task(name="tenancy.tasks.stored_objects_expire", ignore_result=True)
def stored_objects_expire() -> dict[str, int]:
    """Delete the stored responses and conversations past their tenant's retention (hourly)."""
    from datetime import timedelta

    from django.utils import timezone

    now = timezone.now()
    totals = {"responses": 0, "conversations": 0}
    for tenant_id, days in stored_tenants_retention():
        before = now - timedelta(days=days or settings.GATEWAY_STORED_TTL_DAYS)
        for name, count in stored.stored_objects_expire(tenant_ids=[tenant_id], before=before).items():
            totals[name] += count
    return totals
