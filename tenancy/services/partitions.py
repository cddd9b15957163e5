"""The monthly partitions of the usage table on PostgreSQL (migration 0008): created ahead,
dropped past the retention. SQLite has one plain table: nothing to do there.

Partitions are ``tenancy_usagerecord_pYYYYMM`` for ``[first of the month, first of the next)``
in UTC, plus ``tenancy_usagerecord_default`` for whatever falls outside them (rows far in the
past or future). :func:`usage_partitions_maintain` (hourly, the beat task
``usage_partitions_maintain``; ``manage.py usage_partitions``) creates the partitions of this
month and the next ``PARTITIONS_AHEAD`` and, when ``GATEWAY_USAGE_RETENTION_DAYS`` is set,
drops every monthly partition that ended before the retention start: ``DROP TABLE``, so no
DELETE leaves dead rows behind. The rollups, statements and audit of those months stay.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime

from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from tenancy.services.rollups import retention_start

logger = logging.getLogger(__name__)

TABLE = "tenancy_usagerecord"
PARTITIONS_AHEAD = 2
_NAME = re.compile(rf"^{TABLE}_p(\d{{4}})(\d{{2}})$")


def _month_start(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _next_month(start: datetime) -> datetime:
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)


def _months(first: datetime, last: datetime) -> Iterator[datetime]:
    month = _month_start(first)
    while month <= last:
        yield month
        month = _next_month(month)


def partition_name(month: datetime) -> str:
    return f"{TABLE}_p{month:%Y%m}"


def month_partitions_sql(first: datetime | None, last: datetime | None) -> list[str]:
    """``CREATE TABLE ... PARTITION OF`` for every month from ``first`` to ``last`` (None: this one)."""
    now = timezone.now()
    first, last = first or now, last or now
    return [
        f"CREATE TABLE IF NOT EXISTS {partition_name(month)} PARTITION OF {TABLE} "
        f"FOR VALUES FROM ('{month.isoformat()}') TO ('{_next_month(month).isoformat()}')"
        for month in _months(first, last)
    ]


def _partition_create(month: datetime) -> None:
    """Create the partition of ``month``, moving in the rows the default partition holds for it
    (rows that arrived while the partition was missing), then attach it."""
    name, start, end = partition_name(month), month.isoformat(), _next_month(month).isoformat()
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {name} (LIKE {TABLE} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        cursor.execute(
            f"WITH moved AS (DELETE FROM {TABLE}_default WHERE created_at >= %s AND created_at < %s RETURNING *) "
            f"INSERT INTO {name} SELECT * FROM moved",
            [start, end],
        )
        cursor.execute(f"ALTER TABLE {TABLE} ATTACH PARTITION {name} FOR VALUES FROM ('{start}') TO ('{end}')")


def is_partitioned() -> bool:
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_partitioned_table WHERE partrelid = %s::regclass", [TABLE])
        return cursor.fetchone() is not None


def usage_partitions() -> list[str]:
    """The names of the usage table's partitions (empty when it is not partitioned)."""
    if not is_partitioned():
        return []
    with connection.cursor() as cursor:
        cursor.execute("SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = %s::regclass", [TABLE])
        return sorted(row[0] for row in cursor.fetchall())


def usage_partitions_maintain(now: datetime | None = None, *, dry_run: bool = False) -> dict[str, list[str]]:
    """Create the coming months' partitions, drop those past the retention; say which.

    ``now`` may be any instant: a partition is created for its month and the next
    ``PARTITIONS_AHEAD`` months, so this also makes the partition of a past month."""
    done: dict[str, list[str]] = {"created": [], "dropped": [], "failed": []}
    if not is_partitioned():
        return done
    now = now or timezone.now()
    existing = set(usage_partitions())
    ahead = _month_start(now)
    for _ in range(PARTITIONS_AHEAD):
        ahead = _next_month(ahead)
    for month in _months(now, ahead):
        name = partition_name(month)
        if name in existing:
            continue
        if not dry_run:
            try:
                _partition_create(month)
            except DatabaseError as exc:
                logger.error("usage partition %s could not be created: %s", name, exc)
                done["failed"].append(name)
                continue
        done["created"].append(name)
    keep_from = retention_start(now)
    if keep_from is None:
        return done
    for name in sorted(existing):
        match = _NAME.match(name)
        if match is None:
            continue
        end = _next_month(datetime(int(match[1]), int(match[2]), 1, tzinfo=UTC))
        if end > keep_from:
            continue
        if not dry_run:
            with transaction.atomic(), connection.cursor() as cursor:
                # Deferred foreign-key checks of rows written earlier in this transaction run now:
                # PostgreSQL drops no table with pending trigger events.
                cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
                cursor.execute(f"ALTER TABLE {TABLE} DETACH PARTITION {name}")
                cursor.execute(f"DROP TABLE {name}")
        logger.info("usage partition %s dropped (retention)", name)
        done["dropped"].append(name)
    return done
