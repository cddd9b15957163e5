"""The Celery application. Tasks live in each app's tasks.py and take ids, not objects."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.conf.settings")

app = Celery("gateway")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Periodic work (run a worker with -B, or a separate `celery -A gateway.conf.celery beat`).
app.conf.beat_schedule = {
    # Re-admit accounts disabled by an upstream error or with an open circuit.
    "accounts-probe": {"task": "accounts.probe", "schedule": 30.0},
}
