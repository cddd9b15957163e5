"""The arithmetic of billing rollups: buckets, measures, latency histograms, local periods.

Pure functions (no database), shared by the rollup services (tenancy.services.rollups), the
report selectors (tenancy.reports) and the tests, which check the rollups against a direct
sum over the records with the same functions.

**Buckets.** Records are rolled up into 15-minute UTC buckets (``BUCKET_SECONDS``) per
``(tenant, key, model, upstream account, price version)``. Every real time zone's offset is a
multiple of 15 minutes, so a local hour, day or month is a whole number of buckets.

**What a record adds** (:func:`rollup_records`). The record's own answer goes to its account:
``requests`` +1, ``errors`` +1 when its status is 400 or more, ``unknown_usage`` +1 when the
upstream was asked (outcome other than ``rejected``) but its input or output tokens are unknown,
its latency and time to first byte in the histograms, and its tokens when known. Each failed
attempt (failover) goes to the attempt's account: ``failed_attempts`` +1 and the attempt's tokens
when the upstream reported them (input, output and total known: what the data plane bills). Tokens
are counted per billed kind as ``tenancy.pricing.billed_tokens`` carves them, and cost in exact
pico-USD at the price version effective at the record's time in the price table given (the
current one: adding a version in the past and rolling up again re-rates).

**Percentiles.** Latency and TTFB are kept as a fixed log-scale histogram, sparse (``{bin:
count}``): bin 0 holds [0, 1) ms, bin ``i >= 1`` holds [2^((i-1)/8), 2^(i/8)) ms, up to bin
``HIST_BINS - 1`` which also takes everything above 2^24 ms (4.7 hours). Histograms add
exactly, so an hour, a day or a month has exactly the histogram of its records, whichever
buckets it is derived from. A percentile is the nearest-rank percentile of that histogram,
reported as its bin's geometric midpoint: within 2^(1/16) - 1 = 4.43 % of the exact
nearest-rank value of the records (within 0.5 ms below 1 ms; values above 4.7 h are capped).
"""

from __future__ import annotations

import math
import zoneinfo
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple

from tenancy.pricing import PriceTable, billed_tokens, carve, cost_pusd, rates_micro
from tenancy.zones import time_zone_validate as time_zone_validate
from tenancy.zones import zone as zone

BUCKET_SECONDS = 900
BUCKET = timedelta(seconds=BUCKET_SECONDS)
HIST_PER_OCTAVE = 8
HIST_OCTAVES = 24
HIST_BINS = HIST_PER_OCTAVE * HIST_OCTAVES + 2
HIST_RELATIVE_ERROR = 2 ** (1 / (2 * HIST_PER_OCTAVE)) - 1

# The summed columns of a rollup row, in the order of Measures.counts.
COUNT_FIELDS = (
    "requests",
    "errors",
    "failed_attempts",
    "unknown_usage",
    "input_uncached_tokens",
    "input_cached_tokens",
    "input_cache_write_tokens",
    "output_visible_tokens",
    "output_reasoning_tokens",
    "cost_pusd",
)
HIST_FIELDS = ("latency_hist", "ttfb_hist")
GRANULARITIES = ("hour", "day", "month")


def bucket_floor(moment: datetime) -> datetime:
    """The start of the 15-minute UTC bucket holding ``moment`` (aware)."""
    stamp = int(moment.timestamp()) // BUCKET_SECONDS * BUCKET_SECONDS
    return datetime.fromtimestamp(stamp, UTC)


def bucket_ceil(moment: datetime) -> datetime:
    """The first bucket start at or after ``moment``."""
    start = bucket_floor(moment)
    return start if start == moment else start + BUCKET


def is_bucket_aligned(moment: datetime) -> bool:
    return moment.timestamp() % BUCKET_SECONDS == 0


def hist_bin(value_ms: float) -> int:
    """The histogram bin of a duration in milliseconds (see the module docstring)."""
    if not value_ms >= 1.0:  # also NaN
        return 0
    index = 1 + math.floor(math.log2(value_ms) * HIST_PER_OCTAVE)
    return min(index, HIST_BINS - 1)


def hist_value(index: int) -> float:
    """The value a bin stands for: its geometric midpoint (0.5 ms for bin 0)."""
    if index <= 0:
        return 0.5
    return float(2 ** ((index - 0.5) / HIST_PER_OCTAVE))


def percentile(hist: Mapping[int, int], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0 < q <= 1) of a histogram, None when it is empty."""
    total = sum(hist.values())
    if total <= 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(hist):
        seen += hist[index]
        if seen >= rank:
            return round(hist_value(index), 3)
    return None  # pragma: no cover - rank <= total


def hist_load(raw: Any) -> Counter[int]:
    """A stored histogram (JSON object of bin -> count) as a Counter of int bins."""
    if not raw:
        return Counter()
    if isinstance(raw, str):
        import json

        raw = json.loads(raw)
    return Counter({int(index): int(count) for index, count in raw.items()})


def hist_dump(hist: Counter[int]) -> dict[str, int]:
    return {str(index): count for index, count in sorted(hist.items()) if count}


@dataclass(slots=True)
class Measures:
    """What a rollup row sums: counts (``COUNT_FIELDS`` order) and two histograms."""

    counts: list[int] = field(default_factory=lambda: [0] * len(COUNT_FIELDS))
    latency: Counter[int] = field(default_factory=Counter)
    ttfb: Counter[int] = field(default_factory=Counter)

    def add(self, other: Measures) -> None:
        mine = self.counts
        for index, value in enumerate(other.counts):
            mine[index] += value
        self.latency.update(other.latency)
        self.ttfb.update(other.ttfb)

    def add_row(self, row: Mapping[str, Any], *, hists: bool = True) -> None:
        """Add a stored rollup row (a dict with ``COUNT_FIELDS`` and, if ``hists``, ``HIST_FIELDS``)."""
        mine = self.counts
        for index, name in enumerate(COUNT_FIELDS):
            mine[index] += int(row[name] or 0)
        if hists:
            self.latency.update(hist_load(row.get("latency_hist")))
            self.ttfb.update(hist_load(row.get("ttfb_hist")))

    def fields(self) -> dict[str, Any]:
        """The model fields of a rollup row."""
        return {
            **dict(zip(COUNT_FIELDS, self.counts, strict=True)),
            "latency_hist": hist_dump(self.latency),
            "ttfb_hist": hist_dump(self.ttfb),
        }

    def get(self, name: str) -> int:
        return self.counts[COUNT_FIELDS.index(name)]


class RollupKey(NamedTuple):
    """The dimensions of a 15-minute rollup row."""

    bucket_start: datetime
    tenant_id: int
    api_key_id: int | None
    model: str
    account_id: int | None
    price_version_id: int | None


class RecordRow(NamedTuple):
    """The columns of a usage record the rollup reads (``RECORD_COLUMNS`` order)."""

    id: int
    created_at: datetime
    tenant_id: int
    api_key_id: int | None
    account_id: int | None
    model: str
    status_code: int
    outcome: str
    latency_ms: float
    ttfb_ms: float | None
    input_tokens: int | None
    cached_tokens: int | None
    cache_write_tokens: int | None
    output_tokens: int | None
    reasoning_tokens: int | None
    attempts: Any


RECORD_COLUMNS = RecordRow._fields


def _add_tokens(counts: list[int], billed: tuple[int, int, int, int, int]) -> None:
    counts[4] += billed[0]
    counts[5] += billed[1]
    counts[6] += billed[2]
    counts[7] += billed[3]
    counts[8] += billed[4]


def _attempt_account(raw: Any) -> int | None:
    return raw if isinstance(raw, int) and not isinstance(raw, bool) else None


def _attempt_billed(attempt: Any) -> tuple[int, int, int, int, int] | None:
    if not isinstance(attempt, dict) or attempt.get("total_tokens") is None:
        return None
    return billed_tokens(attempt)


def rollup_records(records: Iterable[RecordRow], prices: PriceTable) -> dict[RollupKey, Measures]:
    """The 15-minute rollup rows of ``records`` (see the module docstring), priced with ``prices``.

    Tokens are summed per row and the row's cost computed once from the sums: a row has one
    price version, and the cost of a sum of tokens is the sum of their costs (exact integers).
    """
    rows: dict[RollupKey, Measures] = {}
    buckets: dict[int, datetime] = {}
    for record in records:
        stamp = int(record.created_at.timestamp()) // BUCKET_SECONDS * BUCKET_SECONDS
        bucket = buckets.get(stamp)
        if bucket is None:
            bucket = buckets[stamp] = datetime.fromtimestamp(stamp, UTC)
        price = prices.lookup(record.model, record.created_at)
        key = RollupKey(
            bucket, record.tenant_id, record.api_key_id, record.model, record.account_id, price.id if price else None
        )
        measures = rows.get(key)
        if measures is None:
            measures = rows[key] = Measures()
        counts = measures.counts
        counts[0] += 1
        if record.status_code >= 400:
            counts[1] += 1
        measures.latency[hist_bin(record.latency_ms)] += 1
        if record.ttfb_ms is not None:
            measures.ttfb[hist_bin(record.ttfb_ms)] += 1
        billed = carve(
            record.input_tokens,
            record.cached_tokens,
            record.cache_write_tokens,
            record.output_tokens,
            record.reasoning_tokens,
        )
        if billed is None:
            if record.outcome != "rejected":
                counts[3] += 1
        else:
            _add_tokens(counts, billed)
        attempts = record.attempts
        if not attempts or attempts == "[]":
            continue
        if isinstance(attempts, str):
            attempts = _json_list(attempts)
        for attempt in attempts:
            account = _attempt_account(attempt.get("account_id")) if isinstance(attempt, dict) else None
            other = key._replace(account_id=account)
            at = rows.get(other)
            if at is None:
                at = rows[other] = Measures()
            at.counts[2] += 1
            attempt_billed = _attempt_billed(attempt)
            if attempt_billed is not None:
                _add_tokens(at.counts, attempt_billed)
    rates: dict[int, tuple[int, int, int, int, int]] = {price.id: rates_micro(price) for price in prices.versions()}
    for key, measures in rows.items():
        if key.price_version_id is not None:
            measures.counts[9] = cost_pusd(tuple(measures.counts[4:9]), rates[key.price_version_id])  # type: ignore[arg-type]
    return rows


def _json_list(text: str) -> list[Any]:
    import json

    value = json.loads(text)
    return value if isinstance(value, list) else []


# Local time: a tenant's reporting time zone.


def local_to_utc(local: datetime, tz: zoneinfo.ZoneInfo) -> datetime:
    """A naive local wall time in ``tz`` as an aware UTC instant (a time skipped by a DST jump maps
    to the jump itself; a repeated time to its first occurrence)."""
    return local.replace(tzinfo=tz).astimezone(UTC)


def period_of(moment: datetime, tz: zoneinfo.ZoneInfo, granularity: str) -> datetime:
    """The naive local start of the hour, day or month holding ``moment`` in ``tz``."""
    local = moment.astimezone(tz).replace(tzinfo=None)
    if granularity == "hour":
        return local.replace(minute=0, second=0, microsecond=0)
    if granularity == "day":
        return local.replace(hour=0, minute=0, second=0, microsecond=0)
    if granularity == "month":
        return local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    raise ValueError(f"unknown granularity {granularity!r}")


def period_next(start: datetime, granularity: str) -> datetime:
    """The naive local start of the period after the one starting at ``start``."""
    if granularity == "hour":
        return start + timedelta(hours=1)
    if granularity == "day":
        return start + timedelta(days=1)
    if granularity == "month":
        return (
            start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        )
    raise ValueError(f"unknown granularity {granularity!r}")


def month_range(year: int, month: int, tz: zoneinfo.ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC instants ``[start, end)`` of a calendar month in ``tz``."""
    start = datetime(year, month, 1)
    return local_to_utc(start, tz), local_to_utc(period_next(start, "month"), tz)


def day_range(day: date, tz: zoneinfo.ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC instants ``[start, end)`` of a local day in ``tz``."""
    start = datetime(day.year, day.month, day.day)
    return local_to_utc(start, tz), local_to_utc(start + timedelta(days=1), tz)


def local_day(moment: datetime, tz: zoneinfo.ZoneInfo) -> date:
    return moment.astimezone(tz).date()
