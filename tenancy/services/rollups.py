"""Billing rollups: usage records -> 15-minute buckets -> the tenants' local days.

Every write here *recomputes* from the records: a bucket's rows are deleted and inserted again
in one transaction, never incremented, so running any period twice gives the same rows, and a
late record is counted by whichever run next covers its bucket. Runs take one lock (a
PostgreSQL advisory lock; a file lock beside the SQLite database) for reading the records and
writing the rows, so two runs never interleave (and a slower run never overwrites a newer one's
rows with older figures).

- :func:`rollup_period`: recompute the buckets of ``[start, end)`` (optionally one model's
  rows only: re-rating), then the affected local days.
- :func:`rollup_recent`: what the beat task runs every few minutes. It rolls up the buckets of
  every record inserted since the watermark (the highest record id seen by the last run), minus
  ``GATEWAY_BILLING_ID_OVERLAP`` ids: ids are taken when a row is inserted but become visible
  when its transaction commits, so a batch committed late may carry ids below one already seen;
  the overlap re-reads them. Late records (created long ago, inserted now: a journal drained
  after an outage) have fresh ids, so their old buckets are recomputed too.
- :func:`rollup_sweep`: the daily safety net, recomputing the last ``GATEWAY_BILLING_SWEEP_HOURS``.
- :func:`rollup_days_rebuild`: after a tenant's time zone changes, its days in the new zone.
- :func:`rerate_preview` / :func:`rerate_range`: what a price version effective in the past
  changes, per tenant, before (dry run) and the range to recompute after it is added.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import TextField
from django.db.models.functions import Cast
from django.utils import timezone
from psycopg.types.json import Jsonb

from tenancy import pricing
from tenancy.billing import (
    BUCKET,
    RECORD_COLUMNS,
    Measures,
    RecordRow,
    RollupKey,
    bucket_ceil,
    bucket_floor,
    day_range,
    local_day,
    rollup_records,
    zone,
)
from tenancy.models import BillingState, PriceVersion, Tenant, UsageRecord, UsageRollup, UsageRollupDay
from tenancy.reports import summed

logger = logging.getLogger(__name__)

ROLLUP_STATE = "rollup"
# The Celery tasks (tenancy/tasks.py), queued by name.
BILLING_ROLLUP_RECENT_TASK = "tenancy.tasks.billing_rollup_recent"
BILLING_ROLLUP_SWEEP_TASK = "tenancy.tasks.billing_rollup_sweep"
BILLING_ROLLUP_PERIOD_TASK = "tenancy.tasks.billing_rollup_period"
BILLING_RERATE_TASK = "tenancy.tasks.billing_rerate"
BILLING_DAYS_REBUILD_TASK = "tenancy.tasks.billing_days_rebuild"
USAGE_PARTITIONS_MAINTAIN_TASK = "tenancy.tasks.usage_partitions_maintain"
# Records are read and rows written in chunks of this much time (one transaction each).
CHUNK = timedelta(hours=6)
_ADVISORY_LOCK_ID = 0x6269_6C6C  # "bill"
_DIMENSIONS = ("tenant_id", "api_key_id", "model", "account_id", "price_version_id")
_INSERT_BATCH = 2000


@dataclass
class RollupResult:
    records: int = 0
    rows: int = 0
    days: int = 0
    buckets: int = 0
    tenant_ids: set[int] = field(default_factory=set)  # tenants whose rows were rewritten

    def add(self, other: RollupResult) -> None:
        self.records += other.records
        self.rows += other.rows
        self.days += other.days
        self.buckets += other.buckets
        self.tenant_ids |= other.tenant_ids


_held = threading.local()


@contextlib.contextmanager
def billing_lock() -> Iterator[None]:
    """One transaction holding the billing lock (see the module docstring); re-entrant."""
    if getattr(_held, "depth", 0):
        _held.depth += 1
        try:
            with transaction.atomic():
                yield
        finally:
            _held.depth -= 1
        return
    with contextlib.ExitStack() as stack:
        if connection.vendor != "postgresql":
            handle = stack.enter_context(open(Path(settings.DATA_DIR) / "billing.lock", "a+b"))
            fcntl.flock(handle, fcntl.LOCK_EX)
            stack.callback(fcntl.flock, handle, fcntl.LOCK_UN)
        stack.enter_context(transaction.atomic())
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_ADVISORY_LOCK_ID])
            else:
                # SQLite: write first, so the transaction holds the write lock before it reads (a
                # read snapshot that another writer commits past can no longer be upgraded).
                table = connection.ops.quote_name(BillingState._meta.db_table)
                cursor.execute(f"UPDATE {table} SET last_record_id = last_record_id WHERE id = -1")
        _held.depth = 1
        try:
            yield
        finally:
            _held.depth = 0


def retention_start(now: datetime | None = None) -> datetime | None:
    """The oldest instant whose records are still kept (None: all are kept).

    Records older than ``GATEWAY_USAGE_RETENTION_DAYS`` may have been dropped with their
    partition: their rollups are the only history left and are never recomputed.
    """
    days: int = settings.GATEWAY_USAGE_RETENTION_DAYS
    if not days:
        return None
    now = now or timezone.now()
    # One day of margin: a partition is dropped only once all of it is past the retention.
    return bucket_ceil(now - timedelta(days=days - 1))


def price_table(model: str | None = None) -> pricing.PriceTable:
    prices = PriceVersion.objects.all() if model is None else PriceVersion.objects.filter(model=model)
    return pricing.PriceTable(pricing.Price.from_row(row) for row in prices.values())


def _records(start: datetime, end: datetime, model: str | None) -> Iterator[RecordRow]:
    """The records created in ``[start, end)``, streamed (one server-side cursor on PostgreSQL)."""
    rows = UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end).order_by()
    if model is not None:
        rows = rows.filter(model=model)
    # attempts as text: most are "[]", which needs no JSON parsing (tenancy.billing parses the rest).
    rows = rows.annotate(attempts_text=Cast("attempts", TextField()))
    for values in rows.values_list(*RECORD_COLUMNS[:-1], "attempts_text").iterator(chunk_size=20_000):
        yield RecordRow(*values)


def _rollup_chunk(start: datetime, end: datetime, model: str | None, prices: pricing.PriceTable) -> RollupResult:
    """Recompute the 15-minute rows of ``[start, end)`` (bucket-aligned) and the local days they
    touch, in one locked transaction: readers never see buckets and days that disagree."""
    result = RollupResult(buckets=int((end - start) / BUCKET))
    with billing_lock():
        counter = _Counting(_records(start, end, model))
        rows = rollup_records(counter, prices)
        result.records = counter.count
        old = UsageRollup.objects.filter(bucket_start__gte=start, bucket_start__lt=end)
        if model is not None:
            old = old.filter(model=model)
        result.tenant_ids = set(old.order_by().values_list("tenant_id", flat=True).distinct())
        result.tenant_ids |= {key.tenant_id for key in rows}
        old._raw_delete(old.db)  # no signals, no cascades to collect: one DELETE
        rows_insert(UsageRollup, _rollup_objects(rows))
        result.rows = len(rows)
        # Only the days of tenants that had or have rows in the chunk can have changed.
        if result.tenant_ids:
            result.days = _days_rebuild_range(start, end, result.tenant_ids)
    return result


def rows_insert(model: type[UsageRollup] | type[UsageRollupDay], objects: Iterable[Any]) -> None:
    """Insert rollup rows: ``COPY`` on PostgreSQL (a multi-row INSERT spends most of its time
    composing tens of thousands of parameters), ``bulk_create`` elsewhere."""
    if connection.vendor != "postgresql":
        model.objects.bulk_create(objects, batch_size=_INSERT_BATCH)
        return
    fields = [f for f in model._meta.concrete_fields if not f.primary_key]
    names = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    table = connection.ops.quote_name(model._meta.db_table)
    with connection.cursor() as cursor, cursor.cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
        for obj in objects:
            copy.write_row(
                [
                    Jsonb(value) if isinstance(value, dict) else value
                    for value in (getattr(obj, f.attname) for f in fields)
                ]
            )


class _Counting:
    """An iterator that counts what passes through it."""

    def __init__(self, items: Iterable[RecordRow]) -> None:
        self._items = iter(items)
        self.count = 0

    def __iter__(self) -> Iterator[RecordRow]:
        for item in self._items:
            self.count += 1
            yield item


def _rollup_objects(rows: dict[RollupKey, Measures]) -> Iterator[UsageRollup]:
    for key, measures in rows.items():
        yield UsageRollup(
            bucket_start=key.bucket_start,
            tenant_id=key.tenant_id,
            api_key_id=key.api_key_id,
            model=key.model,
            account_id=key.account_id,
            price_version_id=key.price_version_id,
            **measures.fields(),
        )


def rollup_period(*, start: datetime, end: datetime, model: str | None = None) -> RollupResult:
    """Recompute the rollups of ``[start, end)`` (widened to whole buckets) from the records.

    ``model``: only that model's rows (re-rating a model). Records older than the retention
    (:func:`retention_start`) are not recomputed: the range is clamped to it. With each chunk,
    every local day it touches (per tenant, in its ``rollup_time_zone``) is rebuilt from its
    buckets, in the same transaction.
    Idempotent: the rows depend on the records and prices only.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    start, end = bucket_floor(start), bucket_ceil(end)
    keep_from = retention_start()
    if keep_from is not None and start < keep_from:
        logger.warning("billing rollup: %s is past the usage retention; starting at %s", start, keep_from)
        start = keep_from
    result = RollupResult()
    if end <= start:
        return result
    prices = price_table(model)
    chunk_start = start
    while chunk_start < end:
        chunk_end = min(chunk_start + CHUNK, end)
        result.add(_rollup_chunk(chunk_start, chunk_end, model, prices))
        chunk_start = chunk_end
    return result


def _days_rebuild_range(start: datetime, end: datetime, tenant_ids: Iterable[int] | None = None) -> int:
    """Rebuild the local days overlapping ``[start, end)`` of every tenant (or ``tenant_ids``)."""
    tenants = Tenant.objects.all() if tenant_ids is None else Tenant.objects.filter(pk__in=list(tenant_ids))
    by_zone: dict[str, list[int]] = defaultdict(list)
    for tenant_id, zone_name in tenants.values_list("id", "rollup_time_zone"):
        by_zone[zone_name].append(tenant_id)
    rebuilt = 0
    for zone_name, ids in by_zone.items():
        tz = zone(zone_name)
        day = local_day(start, tz)
        last = local_day(end - timedelta(microseconds=1), tz)
        while day <= last:
            rebuilt += _day_rebuild(day, zone_name, ids)
            day += timedelta(days=1)
    return rebuilt


def _day_rebuild(day: date, zone_name: str, tenant_ids: list[int]) -> int:
    """Rebuild one local day of the tenants ``tenant_ids`` (all in ``zone_name``); return rows."""
    day_start, day_end = day_range(day, zone(zone_name))
    with billing_lock():
        # The zone may have changed since it was read: only tenants still on it.
        ids = list(Tenant.objects.filter(pk__in=tenant_ids, rollup_time_zone=zone_name).values_list("id", flat=True))
        sums: dict[tuple[Any, ...], Measures] = {}
        source = UsageRollup.objects.filter(tenant_id__in=ids, bucket_start__gte=day_start, bucket_start__lt=day_end)
        for row in summed(source.order_by(), list(_DIMENSIONS), hists=True):
            key = tuple(row[name] for name in _DIMENSIONS)
            measures = sums.get(key)
            if measures is None:
                measures = sums[key] = Measures()
            measures.add_row(row)
        old = UsageRollupDay.objects.filter(tenant_id__in=ids, day=day, time_zone=zone_name)
        old._raw_delete(old.db)
        rows_insert(
            UsageRollupDay,
            (
                UsageRollupDay(
                    day=day, time_zone=zone_name, **dict(zip(_DIMENSIONS, key, strict=True)), **measures.fields()
                )
                for key, measures in sums.items()
            ),
        )
    return len(sums)


def rollup_days_rebuild(*, tenant_id: int) -> int:
    """Rebuild every local day of a tenant in its (new) ``time_zone``; return the day rows written.

    One transaction under the billing lock: readers see the old days (in the old zone, which
    reports then read from the 15-minute rows) until the new ones are all there.
    """
    rows = 0
    with billing_lock():
        tenant = Tenant.objects.filter(pk=tenant_id).first()
        if tenant is None:
            return 0
        old = UsageRollupDay.objects.filter(tenant_id=tenant_id)
        old._raw_delete(old.db)
        Tenant.objects.filter(pk=tenant_id).update(rollup_time_zone=tenant.time_zone)
        span = UsageRollup.objects.filter(tenant_id=tenant_id).order_by()
        first = span.order_by("bucket_start").values_list("bucket_start", flat=True).first()
        last = span.order_by("-bucket_start").values_list("bucket_start", flat=True).first()
        if first is None or last is None:
            return 0
        tz = zone(tenant.time_zone)
        day = local_day(first, tz)
        while day <= local_day(last, tz):
            rows += _day_rebuild(day, tenant.time_zone, [tenant_id])
            day += timedelta(days=1)
    return rows


def _state() -> BillingState:
    state, _ = BillingState.objects.get_or_create(name=ROLLUP_STATE)
    return state


def data_as_of() -> datetime | None:
    """Records inserted before this instant are in the rollups (None: never rolled up)."""
    return BillingState.objects.filter(name=ROLLUP_STATE).values_list("as_of", flat=True).first()


def _ranges(buckets: Iterable[datetime]) -> list[tuple[datetime, datetime]]:
    """Sorted bucket starts merged into contiguous ``[start, end)`` ranges."""
    ranges: list[tuple[datetime, datetime]] = []
    for bucket in sorted(set(buckets)):
        if ranges and ranges[-1][1] == bucket:
            ranges[-1] = (ranges[-1][0], bucket + BUCKET)
        else:
            ranges.append((bucket, bucket + BUCKET))
    return ranges


def rollup_recent() -> RollupResult:
    """Roll up the buckets of every record inserted since the last run (see the module docstring)."""
    started = timezone.now()
    state = _state()
    newest = UsageRecord.objects.order_by("-id").values_list("id", flat=True).first() or 0
    overlap: int = settings.GATEWAY_BILLING_ID_OVERLAP
    since = max(state.last_record_id - overlap, 0)
    fresh = UsageRecord.objects.filter(id__gt=since, id__lte=newest).order_by()
    buckets = {
        bucket_floor(moment) for moment in fresh.values_list("created_at", flat=True).iterator(chunk_size=50_000)
    }
    result = RollupResult()
    for start, end in _ranges(buckets):
        result.add(rollup_period(start=start, end=end))
    BillingState.objects.filter(pk=state.pk).update(
        last_record_id=max(newest, state.last_record_id), as_of=started, updated_at=timezone.now()
    )
    return result


def rollup_sweep(now: datetime | None = None) -> RollupResult:
    """Recompute the last ``GATEWAY_BILLING_SWEEP_HOURS`` hours (0: nothing)."""
    hours: int = settings.GATEWAY_BILLING_SWEEP_HOURS
    if not hours:
        return RollupResult()
    now = now or timezone.now()
    return rollup_period(start=now - timedelta(hours=hours), end=now)


# Re-rating.


def rerate_range(model: str, effective_from: datetime, *, exclude_id: int | None = None) -> tuple[datetime, datetime]:
    """The instants a version of ``model`` effective from ``effective_from`` applies to:
    until the next later version of the model (or now), bucket-aligned outward."""
    later = PriceVersion.objects.filter(model=model, effective_from__gt=effective_from)
    if exclude_id is not None:
        later = later.exclude(pk=exclude_id)
    until = later.order_by("effective_from").values_list("effective_from", flat=True).first()
    end = min(until, timezone.now()) if until is not None else timezone.now()
    return bucket_floor(effective_from), bucket_ceil(max(end, effective_from))


def rerate_preview(candidate: pricing.Price) -> dict[str, Any]:
    """What adding ``candidate`` (not saved; its ``id`` is 0) would change, per tenant.

    Recomputes the model's rows of the affected range in memory with the candidate added to
    the price table and compares their cost with the stored rollups. Nothing is written.
    """
    start, end = rerate_range(candidate.model, candidate.effective_from)
    keep_from = retention_start()
    if keep_from is not None and start < keep_from:
        start = keep_from
    current = price_table(candidate.model)
    proposed = pricing.PriceTable([*current.versions(), candidate])
    before: dict[int, list[Any]] = defaultdict(lambda: [0, set()])
    after: dict[int, list[Any]] = defaultdict(lambda: [0, set()])
    stored = UsageRollup.objects.filter(model=candidate.model, bucket_start__gte=start, bucket_start__lt=end)
    for tenant_id, cost, price_id in stored.values_list("tenant_id", "cost_pusd", "price_version_id").iterator():
        before[tenant_id][0] += cost
        before[tenant_id][1].add(price_id)
    chunk_start = start
    while chunk_start < end:
        chunk_end = min(chunk_start + CHUNK, end)
        for key, measures in rollup_records(_records(chunk_start, chunk_end, candidate.model), proposed).items():
            after[key.tenant_id][0] += measures.get("cost_pusd")
            after[key.tenant_id][1].add(key.price_version_id)
        chunk_start = chunk_end
    slugs = dict(Tenant.objects.filter(pk__in=set(before) | set(after)).values_list("id", "slug"))
    tenants = []
    for tenant_id in sorted(set(before) | set(after)):
        old_cost, old_ids = before[tenant_id]
        new_cost, new_ids = after[tenant_id]
        tenants.append(
            {
                "tenant": slugs.get(tenant_id, str(tenant_id)),
                "current_cost_usd": str(pricing.pusd_to_usd(old_cost)),
                "new_cost_usd": str(pricing.pusd_to_usd(new_cost)),
                "difference_usd": str(pricing.pusd_to_usd(new_cost - old_cost)),
                "current_price_version_ids": _ids(old_ids),
                "new_price_version_ids": _ids(new_ids),
            }
        )
    return {
        "model": candidate.model,
        "effective_from": candidate.effective_from.astimezone(UTC).isoformat(),
        "from": start.isoformat(),
        "to": end.isoformat(),
        "tenants": tenants,
        "data_as_of": _iso(data_as_of()),
    }


def _ids(ids: set[int | None]) -> list[int | str]:
    """Price version ids, sorted; the candidate (0) as "new"; no price (None) left out."""
    return [("new" if pid == 0 else pid) for pid in sorted(i for i in ids if i is not None)]


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def rollup_timed(start: datetime, end: datetime, model: str | None = None) -> tuple[RollupResult, float]:
    """:func:`rollup_period` and its wall time in seconds (the command prints both)."""
    began = time.perf_counter()
    result = rollup_period(start=start, end=end, model=model)
    return result, time.perf_counter() - began
