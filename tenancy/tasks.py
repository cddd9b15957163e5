"""Celery tasks of the demand side. They take ids and call services.

Services queue them by name (tenancy.services.alerts.BUDGET_ALERT_DELIVER_TASK) and never
import this module; tenancy/apps.py imports it so every process has the tasks registered.
"""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from tenancy.models import BudgetAlert
from tenancy.services import alerts


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
