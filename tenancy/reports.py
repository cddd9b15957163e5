"""Reads of the billing rollups: usage reports, statements, reconciliation (selectors).

Reports read the rollups, never the raw records (the reconciliation report excepted, which
exists to compare the two). A period is summed from two tables:

- ``UsageRollupDay``, the tenants' local days, for the whole local days of the range when the
  report's time zone is the one the tenant's days are built in (``Tenant.rollup_time_zone``);
- ``UsageRollup``, the 15-minute buckets, for everything else: hours, partial days at the ends
  of the range, and tenants whose days are in another zone than the report's.

Both hold the same sums (the day rows are the sums of the buckets), so which one a figure comes
from never changes it; the day table only makes a month cheap to read (31 rows per
combination of dimensions instead of 2,976).
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from django.db import connection
from django.db.models import QuerySet, Sum
from django.db.models.functions import TruncMonth
from django.utils.dateparse import parse_date, parse_datetime

from tenancy.billing import (
    COUNT_FIELDS,
    HIST_FIELDS,
    Measures,
    day_range,
    is_bucket_aligned,
    local_day,
    local_to_utc,
    percentile,
    period_next,
    period_of,
    zone,
)
from tenancy.models import PriceVersion, Tenant, UsageRecord, UsageRollup, UsageRollupDay
from tenancy.pricing import BILLED_KINDS, billed_tokens, pusd_to_usd, rates_micro

# Report dimensions: query name -> rollup column.
DIMENSIONS = {"tenant": "tenant_id", "key": "api_key_id", "model": "model", "account": "account_id"}
# At most this many buckets per report.
MAX_BUCKETS = {"hour": 744, "day": 732, "month": 120}
PERCENTILES = (0.5, 0.9, 0.99)


class ReportError(ValueError):
    """Bad report parameters: ``field`` names the query parameter."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class Group:
    """One result: the summed measures and the price versions they were priced with."""

    measures: Measures = field(default_factory=Measures)
    price_versions: set[int] = field(default_factory=set)
    unpriced: bool = False


# (local period start or None, dimension values...) -> Group
Sums = dict[tuple[Any, ...], Group]


def _add(sums: Sums, key: tuple[Any, ...], row: dict[str, Any], hists: bool) -> None:
    group = sums.get(key)
    if group is None:
        group = sums[key] = Group()
    group.measures.add_row(row, hists=hists)
    price_id = row["price_version_id"]
    if price_id is None:
        if row["requests"] or row["failed_attempts"]:
            group.unpriced = True
    else:
        group.price_versions.add(price_id)


def _full_days(start: datetime, end: datetime, tz: zoneinfo.ZoneInfo) -> tuple[date, date] | None:
    """The first and last local days lying wholly inside ``[start, end)`` (None: none)."""
    first = local_day(start, tz)
    if day_range(first, tz)[0] < start:
        first += timedelta(days=1)
    last = local_day(end - timedelta(microseconds=1), tz)
    if day_range(last, tz)[1] > end:
        last -= timedelta(days=1)
    return (first, last) if first <= last else None


def usage_sums(
    *,
    tenant_ids: Sequence[int] | None,
    start: datetime,
    end: datetime,
    tz_name: str,
    granularity: str | None,
    columns: Sequence[str],
    hists: bool = False,
) -> Sums:
    """Sum the rollups of ``[start, end)`` (bucket-aligned) per local period and ``columns``.

    ``tenant_ids`` None: every tenant. ``granularity`` None: one period (key ``None``).
    ``columns``: rollup columns (``DIMENSIONS`` values, ``price_version_id``). ``hists``: also
    sum the latency and TTFB histograms (bin by bin, in SQL: :func:`hist_sums`).
    """
    tz = zone(tz_name)
    group_columns = [c for c in dict.fromkeys([*columns, "price_version_id"])]
    sums: Sums = {}
    days = _full_days(start, end, tz) if granularity in (None, "day", "month") else None

    def key_of(period: Any, row: dict[str, Any]) -> tuple[Any, ...]:
        return (period, *(row[c] for c in columns))

    def scoped(rows: QuerySet[Any]) -> QuerySet[Any]:
        if tenant_ids is None:
            return rows
        column = "id" if rows.model is Tenant else "tenant_id"
        return rows.filter(**{f"{column}__in": list(tenant_ids)})

    # 1. The day table: whole local days of tenants whose days are in this zone.
    if days is not None:
        rows = scoped(UsageRollupDay.objects.filter(time_zone=tz_name, day__gte=days[0], day__lte=days[1]))
        if granularity == "month":
            rows = rows.annotate(period=TruncMonth("day"))
        period_column = {"day": "day", "month": "period"}.get(granularity or "")
        values = [*group_columns, *([period_column] if period_column else [])]
        for row in summed(rows.order_by(), values, hists):
            period = datetime.combine(row[period_column], datetime.min.time()) if period_column else None
            _add(sums, key_of(period, row), row, hists)
    # 2. The 15-minute table: everything the day table did not cover, in index-friendly pieces:
    # the partial days at the ends for every tenant, and whole days of tenants whose days are
    # in another zone.
    pieces: list[QuerySet[Any]] = []
    in_range = UsageRollup.objects.filter(bucket_start__gte=start, bucket_start__lt=end)
    if days is None:
        pieces.append(scoped(in_range))
    else:
        covered_start, covered_end = day_range(days[0], tz)[0], day_range(days[1], tz)[1]
        pieces.append(scoped(in_range.filter(bucket_start__lt=covered_start)))
        pieces.append(scoped(in_range.filter(bucket_start__gte=covered_end)))
        others = scoped(Tenant.objects.exclude(rollup_time_zone=tz_name).order_by()).values_list("id", flat=True)
        other_ids = list(others)
        if other_ids:
            pieces.append(
                in_range.filter(tenant_id__in=other_ids, bucket_start__gte=covered_start, bucket_start__lt=covered_end)
            )
    for piece in pieces:
        for row in summed(piece.order_by(), [*group_columns, "bucket_start"], hists):
            period = period_of(row["bucket_start"], tz, granularity) if granularity else None
            _add(sums, key_of(period, row), row, hists)
    return sums


def summed(rows: QuerySet[Any], columns: list[str], hists: bool) -> Iterable[dict[str, Any]]:
    """``rows`` grouped by ``columns`` with their counts summed by the database; with ``hists``,
    each group also has its ``latency_hist`` and ``ttfb_hist`` summed (bin by bin, in SQL)."""
    groups = rows.values(*columns).annotate(**{name: Sum(name) for name in COUNT_FIELDS})
    if not hists:
        return groups.iterator(chunk_size=20_000)
    merged = {name: hist_sums(rows, columns, name) for name in HIST_FIELDS}
    found = []
    for group in groups.iterator(chunk_size=20_000):
        key = tuple(_normal(column, group[column]) for column in columns)
        for name in HIST_FIELDS:
            group[name] = merged[name].get(key, {})
        found.append(group)
    return found


def _normal(column: str, value: Any) -> Any:
    """A grouped value as the ORM gives it, whatever the raw cursor gave (SQLite: text)."""
    if column == "bucket_start":
        if isinstance(value, str):
            value = parse_datetime(value)
        if isinstance(value, datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if isinstance(value, datetime) else value
    if column in ("day", "period"):
        if isinstance(value, str):
            return parse_date(value[:10])
        if isinstance(value, datetime):
            return value.date()
    return value


def hist_sums(rows: QuerySet[Any], columns: list[str], hist: str) -> dict[tuple[Any, ...], dict[int, int]]:
    """The histogram ``hist`` of ``rows`` summed per group of ``columns``, in one query
    (PostgreSQL ``jsonb_each_text``, SQLite ``json_each``): {group values: {bin: count}}."""
    inner, params = rows.values(*columns, hist).query.sql_with_params()
    quote = connection.ops.quote_name
    names = ", ".join(f"r.{quote(column)}" for column in columns)
    each = (
        f"jsonb_each_text(r.{quote(hist)}) h" if connection.vendor == "postgresql" else f"json_each(r.{quote(hist)}) h"
    )
    value = "h.value::bigint" if connection.vendor == "postgresql" else "h.value"
    lead = f"{names}, " if columns else ""
    sql = f"SELECT {lead}h.key, SUM({value}) FROM ({inner}) r CROSS JOIN {each} GROUP BY {lead}h.key"
    sums: dict[tuple[Any, ...], dict[int, int]] = {}
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        for row in cursor.fetchall():
            key = tuple(_normal(column, value) for column, value in zip(columns, row, strict=False))
            sums.setdefault(key, {})[int(row[-2])] = int(row[-1])
    return sums


@dataclass(frozen=True)
class ReportQuery:
    tenant_ids: Sequence[int] | None
    start: datetime
    end: datetime
    time_zone: str
    granularity: str
    group_by: tuple[str, ...]
    percentiles: bool = False


def report_check(query: ReportQuery) -> None:
    """Raise ReportError unless the query can be answered (range, alignment, bucket count)."""
    if query.granularity not in MAX_BUCKETS:
        raise ReportError("granularity", "one of hour, day, month.")
    for name, moment in (("from", query.start), ("to", query.end)):
        if not is_bucket_aligned(moment):
            raise ReportError(name, "must be on a 15-minute boundary (rollups are 15-minute buckets).")
    if query.end <= query.start:
        raise ReportError("to", "must be after from.")
    unknown = [name for name in query.group_by if name not in DIMENSIONS]
    if unknown:
        raise ReportError("group_by", f"unknown dimension(s) {', '.join(unknown)}: use tenant, key, model, account.")
    count = len(periods(query.start, query.end, zone(query.time_zone), query.granularity))
    limit = MAX_BUCKETS[query.granularity]
    if count > limit:
        raise ReportError("to", f"at most {limit} {query.granularity} buckets per report ({count} asked).")


def periods(
    start: datetime, end: datetime, tz: zoneinfo.ZoneInfo, granularity: str
) -> list[tuple[datetime, datetime, datetime]]:
    """``(local period start, bucket start, bucket end)`` of each period overlapping ``[start, end)``;
    the first and last buckets are clipped to the range."""
    found = []
    local = period_of(start, tz, granularity)
    while True:
        begin = local_to_utc(local, tz)
        if begin >= end:
            break
        following = period_next(local, granularity)
        found.append((local, max(begin, start), min(local_to_utc(following, tz), end)))
        local = following
        if len(found) > MAX_BUCKETS[granularity] + 1:
            break
    return found


def result_fields(group: Group, *, percentiles_too: bool) -> dict[str, Any]:
    """The measures of a result as the API shows them."""
    m = group.measures
    get = m.get
    result: dict[str, Any] = {
        "num_model_requests": get("requests"),
        "errors": get("errors"),
        "failed_attempts": get("failed_attempts"),
        "unknown_usage_requests": get("unknown_usage"),
        "input_tokens": get("input_uncached_tokens") + get("input_cached_tokens") + get("input_cache_write_tokens"),
        "input_cached_tokens": get("input_cached_tokens"),
        "input_cache_write_tokens": get("input_cache_write_tokens"),
        "output_tokens": get("output_visible_tokens") + get("output_reasoning_tokens"),
        "output_reasoning_tokens": get("output_reasoning_tokens"),
        "cost_usd": str(pusd_to_usd(get("cost_pusd"))),
        "unpriced": group.unpriced,
        "price_version_ids": sorted(group.price_versions),
    }
    if percentiles_too:
        for name, hist in (("latency_ms", m.latency), ("ttfb_ms", m.ttfb)):
            for q in PERCENTILES:
                result[f"{name}_p{round(q * 100)}"] = percentile(hist, q)
    return result


def usage_report(query: ReportQuery, *, as_of: datetime | None) -> dict[str, Any]:
    """The usage report, shaped like OpenAI's usage API: a page of buckets with results."""
    report_check(query)
    tz = zone(query.time_zone)
    columns = [DIMENSIONS[name] for name in query.group_by]
    sums = usage_sums(
        tenant_ids=query.tenant_ids,
        start=query.start,
        end=query.end,
        tz_name=query.time_zone,
        granularity=query.granularity,
        columns=columns,
        hists=query.percentiles,
    )
    slugs = (
        dict(Tenant.objects.filter(pk__in={k[1 + columns.index("tenant_id")] for k in sums}).values_list("id", "slug"))
        if "tenant_id" in columns
        else {}
    )
    by_period: dict[Any, list[tuple[tuple[Any, ...], Group]]] = {}
    for key, group in sums.items():
        by_period.setdefault(key[0], []).append((key[1:], group))
    data = []
    for local, begin, finish in periods(query.start, query.end, tz, query.granularity):
        results = []
        for values, group in sorted(by_period.get(local, []), key=lambda item: _sort_key(item[0])):
            dims = dict(zip(columns, values, strict=True))
            results.append(
                {
                    "object": "gateway.usage.result",
                    "tenant": slugs.get(dims["tenant_id"], dims["tenant_id"]) if "tenant_id" in dims else None,
                    "api_key_id": dims.get("api_key_id"),
                    "model": dims.get("model"),
                    "account_id": dims.get("account_id"),
                    **result_fields(group, percentiles_too=query.percentiles),
                }
            )
        data.append(
            {
                "object": "bucket",
                "start_time": int(begin.timestamp()),
                "end_time": int(finish.timestamp()),
                "start": begin.astimezone(tz).isoformat(),
                "end": finish.astimezone(tz).isoformat(),
                "results": results,
            }
        )
    return {
        "object": "page",
        "data": data,
        "has_more": False,
        "next_page": None,
        "granularity": query.granularity,
        "group_by": list(query.group_by),
        "time_zone": query.time_zone,
        "data_as_of": as_of.isoformat() if as_of else None,
    }


def _sort_key(values: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((value is None, str(value)) for value in values)


# The CSV form of a report: one row per result, the bucket's times first.
REPORT_CSV_COLUMNS = (
    "start_time",
    "end_time",
    "start",
    "end",
    "tenant",
    "api_key_id",
    "model",
    "account_id",
    "num_model_requests",
    "errors",
    "failed_attempts",
    "unknown_usage_requests",
    "input_tokens",
    "input_cached_tokens",
    "input_cache_write_tokens",
    "output_tokens",
    "output_reasoning_tokens",
    "cost_usd",
    "unpriced",
    "price_version_ids",
    *(f"{name}_p{round(q * 100)}" for name in ("latency_ms", "ttfb_ms") for q in PERCENTILES),
)


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's results as flat rows (a bucket without results gives none)."""
    rows = []
    for bucket in report["data"]:
        for result in bucket["results"]:
            row = {name: bucket[name] for name in ("start_time", "end_time", "start", "end")}
            row.update({name: value for name, value in result.items() if name != "object"})
            rows.append(row)
    return rows


# Statements.

TOKEN_KIND_FIELDS = dict(
    zip(
        BILLED_KINDS,
        (
            "input_uncached_tokens",
            "input_cached_tokens",
            "input_cache_write_tokens",
            "output_visible_tokens",
            "output_reasoning_tokens",
        ),
        strict=True,
    )
)


def month_of(text: str) -> tuple[int, int]:
    """``YYYY-MM`` as (year, month); ReportError otherwise."""
    try:
        year, month = (int(part) for part in text.split("-"))
        date(year, month, 1)
    except ValueError:
        raise ReportError("month", "a month as YYYY-MM, e.g. 2026-11.") from None
    return year, month


def statement_lines(tenant: Tenant, start: datetime, end: datetime) -> dict[str, Any]:
    """Line items of ``tenant``'s usage in ``[start, end)``: per model, price version and token kind.

    Amounts are exact (pico-USD ``amount_pusd``; ``amount_usd`` its decimal form); the total
    is their sum. Usage without a price (``price_version_id`` null) is listed with no amount.
    """
    sums = usage_sums(
        tenant_ids=[tenant.pk],
        start=start,
        end=end,
        tz_name=tenant.time_zone,
        granularity=None,
        columns=["model", "price_version_id"],
    )
    prices = {p.pk: p for p in PriceVersion.objects.filter(pk__in={k[2] for k in sums if k[2] is not None})}
    lines = []
    requests = unknown = 0
    for (_, model, price_id), group in sorted(sums.items(), key=lambda item: _sort_key(item[0][1:])):
        m = group.measures
        requests += m.get("requests")
        unknown += m.get("unknown_usage")
        price = prices.get(price_id) if price_id is not None else None
        rates = rates_micro(price) if price is not None else None
        for index, kind in enumerate(BILLED_KINDS):
            tokens = m.get(TOKEN_KIND_FIELDS[kind])
            if not tokens:
                continue
            amount = tokens * rates[index] if rates is not None else None
            lines.append(
                {
                    "model": model,
                    "price_version_id": price_id,
                    "kind": kind,
                    "tokens": tokens,
                    "usd_per_million": str(pusd_to_usd(rates[index])) if rates is not None else None,
                    "amount_pusd": amount,
                    "amount_usd": str(pusd_to_usd(amount)) if amount is not None else None,
                }
            )
    total = sum(line["amount_pusd"] or 0 for line in lines)
    return {
        "lines": lines,
        "totals": {
            "requests": requests,
            "unknown_usage_requests": unknown,
            "tokens": sum(line["tokens"] for line in lines),
            "amount_pusd": total,
            "amount_usd": str(pusd_to_usd(total)),
        },
        "price_version_ids": sorted({line["price_version_id"] for line in lines if line["price_version_id"]}),
    }


def line_key(line: dict[str, Any]) -> tuple[Any, ...]:
    return (line["model"], line["price_version_id"], line["kind"])


# Reconciliation.


def reconciliation(*, start: datetime, end: datetime, account_id: int | None = None) -> dict[str, Any]:
    """Per upstream account and UTC day in ``[start, end)``: what the gateway metered (the
    rollups) against what the upstream reported on each attempt (re-read from the records),
    and the records whose usage is unknown (answered by an upstream, tokens not reported)."""
    metered: dict[tuple[Any, ...], list[int]] = {}
    rows = UsageRollup.objects.filter(bucket_start__gte=start, bucket_start__lt=end)
    if account_id is not None:
        rows = rows.filter(account_id=account_id)
    token_fields = list(TOKEN_KIND_FIELDS.values())
    for row in rows.values("account_id", "bucket_start", "requests", "failed_attempts", *token_fields).iterator():
        key = (row["account_id"], row["bucket_start"].date())
        sums = metered.setdefault(key, [0, 0, 0])
        sums[0] += row["requests"] + row["failed_attempts"]
        sums[1] += sum(row[name] for name in token_fields)
    reported: dict[tuple[Any, ...], dict[str, Any]] = {}

    def entry(account: Any, day: date) -> dict[str, Any]:
        return reported.setdefault(
            (account, day), {"attempts": 0, "tokens": 0, "unknown": 0, "unknown_request_ids": []}
        )

    records = UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end).order_by()
    columns = (
        "request_id",
        "created_at",
        "account_id",
        "outcome",
        "status_code",
        "input_tokens",
        "cached_tokens",
        "cache_write_tokens",
        "output_tokens",
        "reasoning_tokens",
        "attempts",
    )
    for values in records.values_list(*columns).iterator(chunk_size=20_000):
        record = dict(zip(columns, values, strict=True))
        day = record["created_at"].astimezone(UTC).date()
        if account_id is None or record["account_id"] == account_id:
            mine = entry(record["account_id"], day)
            mine["attempts"] += 1
            billed = billed_tokens(record)
            if billed is not None:
                mine["tokens"] += sum(billed)
            elif record["outcome"] != "rejected":
                mine["unknown"] += 1
                if len(mine["unknown_request_ids"]) < 20:
                    mine["unknown_request_ids"].append(record["request_id"])
        for attempt in record["attempts"] or ():
            other = attempt.get("account_id") if isinstance(attempt, dict) else None
            if account_id is not None and other != account_id:
                continue
            theirs = entry(other, day)
            theirs["attempts"] += 1
            billed = billed_tokens(attempt) if attempt.get("total_tokens") is not None else None
            if billed is not None:
                theirs["tokens"] += sum(billed)
    data = []
    for account, day in sorted(set(metered) | set(reported), key=lambda k: (k[1], k[0] is None, k[0] or 0)):
        gateway = metered.get((account, day), [0, 0, 0])
        upstream = reported.get((account, day), {"attempts": 0, "tokens": 0, "unknown": 0, "unknown_request_ids": []})
        data.append(
            {
                "account_id": account,
                "day": day.isoformat(),
                "metered_attempts": gateway[0],
                "metered_tokens": gateway[1],
                "reported_attempts": upstream["attempts"],
                "reported_tokens": upstream["tokens"],
                "difference_tokens": gateway[1] - upstream["tokens"],
                "unknown_usage_records": upstream["unknown"],
                "unknown_usage_request_ids": upstream["unknown_request_ids"],
                "matches": gateway[0] == upstream["attempts"] and gateway[1] == upstream["tokens"],
            }
        )
    return {"object": "list", "data": data}
