"""The console's overview (a selector): totals, a time series, latency and time-to-first-byte
percentiles and the top keys and models over a time range, read from the billing rollups.

The range ``[start, end)`` is cut in three: the whole 15-minute buckets that the rollup job has
finished (``UsageRollup``, tenancy.billing: up to the bucket holding its last run's start,
``data_as_of``), read from the rollups; and the edges (the partial bucket at the start, and
everything since the rollups' last complete bucket: the current quarter hour while the job
runs), read from the raw usage records through their ``created_at`` indexes. A 30-day chart
thus sums at most 2,880 buckets per combination of dimensions, never the month's records.
A minute-by-minute chart (the last hour) reads the raw records of that hour only.

Percentiles come from the rollups' latency histograms (tenancy.billing: within 4.5 % of the
exact value) plus the edges' records grouped by whole millisecond; tokens and cost are the billed
ones (tenancy.billing: failed attempts' tokens included), as on the usage page and statements.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.db.models import Count, F, Q, QuerySet, Sum
from django.db.models.functions import Coalesce, Floor, Trunc

from tenancy.billing import bucket_ceil, bucket_floor, hist_bin, percentile
from tenancy.models import ApiKey, BillingState, UsageRecord, UsageRollup
from tenancy.pricing import pusd_to_usd
from tenancy.reports import hist_sums

# Chart bucket widths (seconds) per kind.
OVERVIEW_BUCKETS = {"minute": 60, "hour": 3600, "day": 86400}
_TOKENS = (
    F("input_uncached_tokens")
    + F("input_cached_tokens")
    + F("input_cache_write_tokens")
    + F("output_visible_tokens")
    + F("output_reasoning_tokens")
)
_ROLLUP_SUMS = {"requests": Sum("requests"), "errors": Sum("errors"), "tokens": Sum(_TOKENS), "pusd": Sum("cost_pusd")}
_RAW_SUMS = {
    "requests": Count("id"),
    "errors": Count("id", filter=Q(status_code__gte=400)),
    "tokens": Coalesce(Sum("total_tokens"), 0),
    "usd": Sum("cost"),
}


def rolled_up_until() -> datetime | None:
    """The end of the last 15-minute bucket the rollup job has finished (None: it never ran)."""
    as_of = BillingState.objects.filter(name="rollup").values_list("as_of", flat=True).first()
    return bucket_floor(as_of) if as_of is not None else None


def _split(start: datetime, end: datetime, bucket: str) -> tuple[tuple[datetime, datetime] | None, list[Any]]:
    """The rolled-up part of ``[start, end)`` (None: none) and the raw edges."""
    until = rolled_up_until()
    low, high = bucket_ceil(start), min(bucket_floor(end), until) if until else None
    if bucket == "minute" or high is None or high <= low:
        return None, [(start, end)]
    edges = [(start, low)] if start < low else []
    if high < end:
        edges.append((high, end))
    return (low, high), edges


class _Tally:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.cost = Decimal(0)

    def add(self, row: dict[str, Any], *, rollup: bool) -> None:
        for name in ("requests", "errors", "tokens"):
            self.counts[name] += int(row.get(name) or 0)
        self.cost += pusd_to_usd(int(row.get("pusd") or 0)) if rollup else Decimal(row.get("usd") or 0)


def usage_overview(
    *, tenant_ids: Sequence[int] | None, start: datetime, end: datetime, bucket: str = "hour", top: int = 5
) -> dict[str, Any]:
    """What the console's overview shows for ``[start, end)``, for the tenants ``tenant_ids``
    (None: all of them).

    Keys: ``requests, errors`` (status >= 400), ``error_rate`` (0..1, None without requests),
    ``tokens``, ``cost`` (Decimal USD), ``latency_p50, latency_p95, ttfb_p50, ttfb_p95`` (ms or
    None), ``series`` (one dict per chart bucket of width ``bucket`` (minute, hour or day) from
    ``start``: ``t`` (epoch s), ``requests, errors, tokens, cost`` (float)), ``top_keys`` (dicts:
    ``api_key_id, name, prefix, tenant, requests, tokens, cost``) and ``top_models`` (``model,
    requests, tokens, cost``), by requests. ``rolled_up`` (the part read from the rollups, or
    None).
    """
    if bucket not in OVERVIEW_BUCKETS:
        raise ValueError(f"unknown bucket {bucket!r}")
    width = OVERVIEW_BUCKETS[bucket]
    rolled, edges = _split(start, end, bucket)
    rollups: QuerySet[UsageRollup] | None = None
    if rolled is not None:
        rollups = UsageRollup.objects.filter(bucket_start__gte=rolled[0], bucket_start__lt=rolled[1])
        if tenant_ids is not None:
            rollups = rollups.filter(tenant_id__in=list(tenant_ids))
    raws: list[QuerySet[UsageRecord]] = []
    for low, high in edges:
        rows = UsageRecord.objects.filter(created_at__gte=low, created_at__lt=high)
        raws.append(rows.filter(tenant_id__in=list(tenant_ids)) if tenant_ids is not None else rows)

    slots: dict[int, _Tally] = {}
    keys: dict[Any, _Tally] = {}
    models: dict[Any, _Tally] = {}
    latency: Counter[int] = Counter()
    ttfb: Counter[int] = Counter()
    if rollups is not None:
        for row in rollups.values("bucket_start").annotate(**_ROLLUP_SUMS).order_by():
            slot = int(row["bucket_start"].timestamp()) // width * width
            slots.setdefault(slot, _Tally()).add(row, rollup=True)
        for group, found in (("api_key_id", keys), ("model", models)):
            for row in rollups.values(group).annotate(**_ROLLUP_SUMS).order_by():
                found.setdefault(row[group], _Tally()).add(row, rollup=True)
        for name, hist in (("latency_hist", latency), ("ttfb_hist", ttfb)):
            for bins in hist_sums(rollups.order_by(), [], name).values():
                hist.update(bins)
    for rows in raws:
        by_slot = rows.annotate(slot=Trunc("created_at", bucket, tzinfo=UTC)).values("slot").annotate(**_RAW_SUMS)
        for row in by_slot.order_by():
            slot = int(row["slot"].timestamp()) // width * width
            slots.setdefault(slot, _Tally()).add(row, rollup=False)
        for group, found in (("api_key_id", keys), ("model", models)):
            for row in rows.values(group).annotate(**_RAW_SUMS).order_by():
                found.setdefault(row[group], _Tally()).add(row, rollup=False)
        for field, hist in (("latency_ms", latency), ("ttfb_ms", ttfb)):
            per_ms = rows.filter(**{f"{field}__isnull": False}).values(ms=Floor(field)).annotate(n=Count("id"))
            for row in per_ms.order_by():
                hist[hist_bin(float(row["ms"]))] += int(row["n"])

    series = []
    slot = int(start.timestamp()) // width * width
    while slot < end.timestamp():
        tally = slots.get(slot) or _Tally()
        point: dict[str, Any] = {"t": slot, **{n: tally.counts[n] for n in ("requests", "errors", "tokens")}}
        point["cost"] = float(tally.cost)
        series.append(point)
        slot += width
    total = _Tally()
    for tally in slots.values():
        total.counts.update(tally.counts)
        total.cost += tally.cost
    requests, errors = total.counts["requests"], total.counts["errors"]
    return {
        "requests": requests,
        "errors": errors,
        "error_rate": errors / requests if requests else None,
        "tokens": total.counts["tokens"],
        "cost": total.cost,
        "latency_p50": percentile(latency, 0.5),
        "latency_p95": percentile(latency, 0.95),
        "ttfb_p50": percentile(ttfb, 0.5),
        "ttfb_p95": percentile(ttfb, 0.95),
        "series": series,
        "top_keys": _top_keys(keys, top),
        "top_models": [{"model": model, **_figures(tally)} for model, tally in _ranked(models, top)],
        "rolled_up": rolled,
    }


def _ranked(found: dict[Any, _Tally], top: int) -> list[tuple[Any, _Tally]]:
    ranked = sorted(found.items(), key=lambda item: (-item[1].counts["requests"], item[0] is None, str(item[0])))
    return [(name, tally) for name, tally in ranked if tally.counts["requests"]][:top]


def _figures(tally: _Tally) -> dict[str, Any]:
    return {"requests": tally.counts["requests"], "tokens": tally.counts["tokens"], "cost": tally.cost}


def _top_keys(found: dict[Any, _Tally], top: int) -> list[dict[str, Any]]:
    ranked = _ranked(found, top)
    known = ApiKey.objects.filter(pk__in=[key_id for key_id, _ in ranked if key_id is not None])
    about: dict[Any, dict[str, Any]] = {
        row["id"]: dict(row) for row in known.values("id", "name", "prefix", tenant_slug=F("tenant__slug"))
    }
    return [
        {
            "api_key_id": key_id,
            "name": about.get(key_id, {}).get("name"),
            "prefix": about.get(key_id, {}).get("prefix"),
            "tenant": about.get(key_id, {}).get("tenant_slug"),
            **_figures(tally),
        }
        for key_id, tally in ranked
    ]
