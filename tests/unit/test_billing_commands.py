"""Billing commands and tasks: usage_seed, billing_rollup, usage_partitions, the beat schedule."""

from __future__ import annotations

import io
import logging
import sqlite3
from typing import Any

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection

from gateway.conf.celery import app as celery_app
from tenancy.models import BillingState, UsageRecord, UsageRollup, UsageRollupDay
from tenancy.services import rollups
from tenancy.services.partitions import is_partitioned
from tenancy.tasks import BillingTask, billing_rollup_period, billing_rollup_recent

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_seed_then_roll_up_with_the_command() -> None:
    said = run("usage_seed", "--records", "300", "--from", "2026-11-01T00:00Z", "--hours", "3", "--tenants", "2")
    assert "Seeded 300 usage records" in said
    assert UsageRecord.objects.count() == 300
    said = run("billing_rollup", "--from", "2026-11-01T00:00Z", "--to", "2026-11-01T03:00Z")
    assert "Rolled up 300 records" in said
    assert sum(UsageRollup.objects.values_list("requests", flat=True)) == 300
    assert sum(UsageRollupDay.objects.values_list("requests", flat=True)) == 300
    # Without --from: what the beat task does, and it moves the watermark and "data as of".
    assert "Rolled up 300 records" in run("billing_rollup")
    state = BillingState.objects.get(name=rollups.ROLLUP_STATE)
    assert state.last_record_id == UsageRecord.objects.order_by("-id").values_list("id", flat=True).first()
    assert state.as_of is not None
    for bad in (["--to", "2026-11-02"], ["--from", "yesterday"], ["--from", "2026-11-02", "--to", "2026-11-01"]):
        with pytest.raises(CommandError):
            call_command("billing_rollup", *bad)
    with pytest.raises(CommandError):
        call_command("usage_seed", "--records", "0")


def test_usage_partitions_command_on_sqlite() -> None:
    if is_partitioned():
        pytest.skip("PostgreSQL: tests/unit/test_usage_partitions.py")
    assert "not partitioned" in run("usage_partitions")


def test_tasks_run_the_services_and_the_beat_schedule_names_registered_tasks() -> None:
    run("usage_seed", "--records", "50", "--from", "2026-11-01T00:00Z", "--hours", "1", "--tenants", "1")
    billing_rollup_recent.apply().get()
    assert sum(UsageRollup.objects.values_list("requests", flat=True)) == 50
    billing_rollup_period.apply(args=("2026-11-01T00:00:00+00:00", "2026-11-01T01:00:00+00:00")).get()
    assert sum(UsageRollup.objects.values_list("requests", flat=True)) == 50
    for entry in settings.CELERY_BEAT_SCHEDULE.values():
        assert entry["task"] in celery_app.tasks


def test_billing_tasks_retry_database_errors_and_log_with_context(caplog: pytest.LogCaptureFixture) -> None:
    assert DatabaseError in BillingTask.autoretry_for
    assert (BillingTask.retry_backoff, BillingTask.retry_backoff_max, BillingTask.max_retries) == (10, 600, 6)
    task: Any = billing_rollup_period
    with caplog.at_level(logging.ERROR, logger="tenancy.tasks"):
        task.on_failure(DatabaseError("down"), "id-1", ("2026-11-01", "2026-11-02"), {}, None)
    assert "billing_rollup_period('2026-11-01', '2026-11-02') failed (id id-1)" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_on_sqlite_the_billing_lock_holds_the_write_lock_before_reading() -> None:
    if connection.vendor != "sqlite":
        pytest.skip("PostgreSQL takes an advisory lock")
    with rollups.billing_lock():
        other = sqlite3.connect(connection.settings_dict["NAME"], timeout=0)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        finally:
            other.close()
