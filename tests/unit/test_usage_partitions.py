"""The usage table's monthly partitions on PostgreSQL (migration 0008, tenancy.services.partitions):
records land in their month's partition, replays are still ignored, partitions are created ahead
(moving rows the default partition holds for them), and retention drops whole partitions while
the rollups of those months stay. Skipped on SQLite, where the table is a plain one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from tenancy.models import ApiKey, Tenant, UsageRecord, UsageRollup
from tenancy.services import rollups
from tenancy.services.partitions import (
    is_partitioned,
    partition_name,
    usage_partitions,
    usage_partitions_maintain,
)
from tenancy.services.usage import usage_records_write

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="partitions are PostgreSQL's"),
]


def _event(key: ApiKey, request_id: str, at: datetime) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "tenant_id": key.tenant_id,
        "api_key_id": key.pk,
        "model": "m",
        "status_code": 200,
        "outcome": "completed",
        "latency_ms": 5.0,
        "created_at": at,
        "input_tokens": 10,
        "output_tokens": 5,
        "total_tokens": 15,
        "cost": None,
        "price_version_id": None,
    }


def _partition_of(request_id: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT tableoid::regclass::text FROM tenancy_usagerecord WHERE request_id = %s", [request_id])
        return cursor.fetchone()[0]


@pytest.fixture
def key(db: Any) -> ApiKey:
    return ApiKey.objects.create(tenant=Tenant.objects.create(slug="p", name="p"), prefix="kp", digest="x")


def test_records_land_in_their_month_and_replays_are_ignored(key: ApiKey) -> None:
    assert is_partitioned()
    march = datetime(2031, 3, 10, tzinfo=UTC)
    usage_records_write([_event(key, "early", march)])
    assert _partition_of("early") == "tenancy_usagerecord_default"  # no partition for 2031 yet
    done = usage_partitions_maintain(now=march)
    assert done["created"] == [partition_name(datetime(2031, m, 1, tzinfo=UTC)) for m in (3, 4, 5)]
    assert done["failed"] == []
    # The row the default partition held moved into its month.
    assert _partition_of("early") == "tenancy_usagerecord_p203103"
    usage_records_write([_event(key, "r1", march + timedelta(days=1))])
    usage_records_write([_event(key, "r1", march + timedelta(days=1)), _event(key, "r2", march)])  # a replay
    assert UsageRecord.objects.filter(request_id="r1").count() == 1
    assert _partition_of("r2") == "tenancy_usagerecord_p203103"
    assert usage_partitions_maintain(now=march)["created"] == []  # idempotent


def test_retention_drops_old_partitions_and_keeps_their_rollups(key: ApiKey) -> None:
    now = timezone.now()
    old = now - timedelta(days=200)
    old_month = partition_name(old.replace(day=1))
    usage_partitions_maintain(now=old)  # the partitions of that month and the next two
    usage_records_write([_event(key, "old", old)])
    assert _partition_of("old") == old_month
    rollups.rollup_period(start=old - timedelta(hours=1), end=old + timedelta(hours=1))
    assert UsageRollup.objects.filter(tenant=key.tenant).count() == 1
    with override_settings(GATEWAY_USAGE_RETENTION_DAYS=90):
        done = usage_partitions_maintain(now=now)
        assert old_month in done["dropped"]
        assert old_month not in usage_partitions()
        assert partition_name(now.replace(day=1)) in usage_partitions()
        assert not UsageRecord.objects.filter(request_id="old").exists()
        # A rollup of a period past the retention recomputes nothing: the rollups stay.
        rollups.rollup_period(start=old - timedelta(hours=1), end=old + timedelta(hours=1))
    assert UsageRollup.objects.filter(tenant=key.tenant).count() == 1
