"""Billing rollups (tenancy.services.rollups) against a direct sum over the records.

Property tests (hypothesis): random record sets delivered in two batches, the second with
late records (their buckets already rolled up, each delivered twice) and the first batch
delivered again; the
rollups equal a sum over the distinct records computed here independently, and recomputing
any period changes nothing.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.db.models import Sum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.services import pool_get_or_create, upstream_account_create
from tenancy import billing
from tenancy.models import ApiKey, PriceVersion, Tenant, UsageRecord, UsageRollup, UsageRollupDay
from tenancy.pricing import billed_tokens
from tenancy.services import rollups
from tenancy.services.prices import price_set
from tenancy.services.usage import usage_records_write

pytestmark = pytest.mark.django_db(transaction=False)

T0 = datetime(2026, 3, 1, 22, 0, tzinfo=UTC)  # the window crosses midnight in both zones
WINDOW = timedelta(hours=4)
MODELS = ("gpt-a", "gpt-b")  # gpt-b has no price


def _reset() -> None:
    for model in (UsageRollupDay, UsageRollup, UsageRecord):
        model.objects.all()._raw_delete(connection.alias)
    rollups.BillingState.objects.all().delete()


@pytest.fixture
def world(db: Any) -> dict[str, Any]:
    first = Tenant.objects.create(slug="t1", name="t1")
    second = Tenant.objects.create(slug="t2", name="t2", time_zone="Asia/Kolkata", rollup_time_zone="Asia/Kolkata")
    keys = [
        ApiKey.objects.create(tenant=first, prefix="k1", digest="x"),
        ApiKey.objects.create(tenant=first, prefix="k2", digest="x"),
        ApiKey.objects.create(tenant=second, prefix="k3", digest="x"),
    ]
    old = price_set(
        model="gpt-a",
        input="1.5",
        cached_input="0.25",
        cache_write="2",
        output="6",
        effective_from=T0 - timedelta(days=30),
    )
    mid = price_set(
        model="gpt-a",
        input="2",
        cached_input="0.5",
        cache_write="2.5",
        output="8",
        reasoning="10",
        effective_from=T0 + timedelta(hours=1, minutes=7),
    )
    pool = pool_get_or_create(name="main")
    accounts = [
        upstream_account_create(pool=pool, base_url=f"http://127.0.0.1:9/v{n}", models=["m"], api_key="sk-up").pk
        for n in (1, 2, 3)
    ]
    return {"tenants": [first, second], "keys": keys, "prices": [old, mid], "accounts": accounts}


tokens = st.one_of(st.none(), st.integers(0, 5000))
usage = st.fixed_dictionaries(
    {
        "input_tokens": tokens,
        "cached_tokens": tokens,
        "cache_write_tokens": tokens,
        "output_tokens": tokens,
        "reasoning_tokens": tokens,
    }
)
attempt = st.builds(
    lambda account, u, total: {
        "account_id": account,
        "outcome": "upstream_error",
        "status": 502,
        **u,
        "total_tokens": total,
    },
    st.sampled_from([1, 2, 3]),
    usage,
    st.one_of(st.none(), st.integers(0, 10_000)),
)
event = st.fixed_dictionaries(
    {
        "key": st.integers(0, 2),
        "account": st.sampled_from([None, 1, 2]),
        "model": st.sampled_from(MODELS),
        "status_code": st.sampled_from([200, 200, 200, 429, 499, 502]),
        "outcome": st.sampled_from(["completed", "incomplete", "rejected", "upstream_error"]),
        "offset": st.integers(0, int(WINDOW.total_seconds()) - 1),
        "latency_ms": st.floats(0.0, 100_000.0, allow_nan=False),
        "ttfb_ms": st.one_of(st.none(), st.floats(0.0, 50_000.0, allow_nan=False)),
        "usage": usage,
        "attempts": st.lists(attempt, max_size=2),
        "late": st.booleans(),
    }
)


def _events(raw: list[dict[str, Any]], world: dict[str, Any]) -> list[dict[str, Any]]:
    events = []
    for n, item in enumerate(raw):
        key = world["keys"][item["key"]]
        events.append(
            {
                "request_id": f"req-{n}",
                "tenant_id": key.tenant_id,
                "api_key_id": key.pk,
                "account_id": world["accounts"][item["account"]] if item["account"] is not None else None,
                "model": item["model"],
                "status_code": item["status_code"],
                "outcome": item["outcome"],
                "latency_ms": item["latency_ms"],
                "ttfb_ms": item["ttfb_ms"],
                "created_at": T0 + timedelta(seconds=item["offset"]),
                "cost": None,
                "price_version_id": None,
                "attempts": [{**a, "account_id": world["accounts"][a["account_id"] - 1]} for a in item["attempts"]],
                "late": item["late"],
                **item["usage"],
                "total_tokens": None,
            }
        )
    return events


def _price_of(world: dict[str, Any], model: str, at: datetime) -> PriceVersion | None:
    if model != "gpt-a":
        return None
    old, mid = world["prices"]
    return mid if at >= mid.effective_from else old


def _cost(billed: tuple[int, ...], price: PriceVersion) -> Decimal:
    reasoning = price.reasoning if price.reasoning is not None else price.output
    rates = (price.input, price.cached_input, price.cache_write, price.output, reasoning)
    return sum((Decimal(t) * r for t, r in zip(billed, rates, strict=True)), Decimal(0)) / 1_000_000


def direct_sums(events: list[dict[str, Any]], world: dict[str, Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The expected rows, computed from the distinct records (the first delivery of each id)."""
    expected: dict[tuple[Any, ...], dict[str, Any]] = defaultdict(
        lambda: {
            "requests": 0,
            "errors": 0,
            "failed_attempts": 0,
            "unknown_usage": 0,
            "tokens": [0] * 5,
            "cost": Decimal(0),
            "latency": Counter(),
            "ttfb": Counter(),
        }
    )
    seen: set[str] = set()
    for e in events:
        if e["request_id"] in seen:
            continue
        seen.add(e["request_id"])
        price = _price_of(world, e["model"], e["created_at"])
        bucket = datetime.fromtimestamp(int(e["created_at"].timestamp()) // 900 * 900, UTC)
        dims = (bucket, e["tenant_id"], e["api_key_id"], e["model"], price.pk if price else None)
        row = expected[(*dims, e["account_id"])]
        row["requests"] += 1
        row["errors"] += e["status_code"] >= 400
        row["latency"][billing.hist_bin(e["latency_ms"])] += 1
        if e["ttfb_ms"] is not None:
            row["ttfb"][billing.hist_bin(e["ttfb_ms"])] += 1
        billed = billed_tokens(e)
        if billed is None:
            row["unknown_usage"] += e["outcome"] != "rejected"
        else:
            row["tokens"] = [a + b for a, b in zip(row["tokens"], billed, strict=True)]
            row["cost"] += _cost(billed, price) if price else 0
        for a in e["attempts"]:
            other = expected[(*dims, a["account_id"])]
            other["failed_attempts"] += 1
            billed = billed_tokens(a) if a["total_tokens"] is not None else None
            if billed is not None:
                other["tokens"] = [x + y for x, y in zip(other["tokens"], billed, strict=True)]
                other["cost"] += _cost(billed, price) if price else 0
    return dict(expected)


def stored_rows() -> dict[tuple[Any, ...], dict[str, Any]]:
    rows = {}
    for r in UsageRollup.objects.all():
        key = (r.bucket_start, r.tenant_id, r.api_key_id, r.model, r.price_version_id, r.account_id)
        assert key not in rows, "one row per bucket and dimensions"
        rows[key] = {
            "requests": r.requests,
            "errors": r.errors,
            "failed_attempts": r.failed_attempts,
            "unknown_usage": r.unknown_usage,
            "tokens": [
                r.input_uncached_tokens,
                r.input_cached_tokens,
                r.input_cache_write_tokens,
                r.output_visible_tokens,
                r.output_reasoning_tokens,
            ],
            "cost": Decimal(r.cost_pusd).scaleb(-12),
            "latency": billing.hist_load(r.latency_hist),
            "ttfb": billing.hist_load(r.ttfb_hist),
        }
    return rows


def snapshot(model: type[UsageRollup] | type[UsageRollupDay]) -> list[tuple[Any, ...]]:
    fields = [f.attname for f in model._meta.concrete_fields if f.attname != "id"]
    return sorted(tuple(str(v) for v in row) for row in model.objects.values_list(*fields))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.lists(event, min_size=1, max_size=40))
def test_rollups_equal_a_direct_sum_with_late_and_duplicated_deliveries(
    world: dict[str, Any], raw: list[dict[str, Any]]
) -> None:
    _reset()
    events = _events(raw, world)
    on_time = [e for e in events if not e["late"]]
    late = [e for e in events if e["late"]]
    usage_records_write(on_time)
    rollups.rollup_recent()
    # Late records (their buckets were rolled up already), delivered twice, and every on-time
    # record delivered a second time: a duplicate delivery is the same event again.
    usage_records_write(late + on_time + late)
    rollups.rollup_recent()
    assert stored_rows() == direct_sums(events, world)
    assert UsageRecord.objects.count() == len({e["request_id"] for e in events})

    # Recomputing the whole window, or any sub-period, changes nothing.
    buckets, days = snapshot(UsageRollup), snapshot(UsageRollupDay)
    rollups.rollup_period(start=T0, end=T0 + WINDOW)
    rollups.rollup_period(start=T0 + timedelta(minutes=50), end=T0 + timedelta(hours=2, minutes=5))
    rollups.rollup_recent()
    assert snapshot(UsageRollup) == buckets
    assert snapshot(UsageRollupDay) == days

    # Each tenant's day rows are the sum of its buckets of that local day, in its time zone.
    for tenant in world["tenants"]:
        tz = billing.zone(tenant.time_zone)
        by_day: dict[Any, Counter[str]] = defaultdict(Counter)
        latency: dict[Any, Counter[int]] = defaultdict(Counter)
        for r in UsageRollup.objects.filter(tenant=tenant):
            by_day[billing.local_day(r.bucket_start, tz)].update({"requests": r.requests, "cost": r.cost_pusd})
            latency[billing.local_day(r.bucket_start, tz)].update(billing.hist_load(r.latency_hist))
        for day, sums in by_day.items():
            day_latency: Counter[int] = Counter()
            for hist in UsageRollupDay.objects.filter(tenant=tenant, day=day).values_list("latency_hist", flat=True):
                day_latency.update(billing.hist_load(hist))
            assert +day_latency == +latency[day]
            got = UsageRollupDay.objects.filter(tenant=tenant, day=day).aggregate(r=Sum("requests"), c=Sum("cost_pusd"))
            assert (got["r"], got["c"]) == (sums["requests"], sums["cost"])
            assert set(UsageRollupDay.objects.filter(tenant=tenant, day=day).values_list("time_zone", flat=True)) == {
                tenant.time_zone
            }


def test_percentiles_of_merged_buckets_are_those_of_all_records() -> None:
    values = [0.2, 3.0, 3.1, 45.0, 46.0, 120.0, 980.0, 1500.0, 30_000.0, 99_999.0, 12.5, 12.6]
    whole = Counter(billing.hist_bin(v) for v in values)
    halves = Counter(billing.hist_bin(v) for v in values[:5])
    halves.update(Counter(billing.hist_bin(v) for v in values[5:]))
    assert halves == whole
    ordered = sorted(values)
    for q in (0.5, 0.9, 0.99, 1.0):
        exact = ordered[max(1, -(-int(q * 100) * len(values) // 100)) - 1]
        got = billing.percentile(whole, q)
        assert got is not None
        if exact >= 1:
            assert abs(got - exact) / exact <= billing.HIST_RELATIVE_ERROR + 1e-9
        else:
            assert abs(got - exact) <= 0.5
    assert billing.percentile(Counter(), 0.5) is None


def test_time_zone_validation() -> None:
    assert billing.time_zone_validate("Asia/Kathmandu") == "Asia/Kathmandu"
    for bad in ("", "Mars/Olympus", "UTC+1", "../etc/passwd"):
        with pytest.raises(ValueError, match="IANA"):
            billing.time_zone_validate(bad)


def test_local_days_and_months_are_whole_buckets_in_quarter_hour_zones() -> None:
    for name in ("Asia/Kathmandu", "Australia/Eucla", "America/St_Johns", "Europe/Paris"):
        tz = billing.zone(name)
        start, end = billing.month_range(2026, 3, tz)  # a DST change in Paris and St Johns
        assert billing.is_bucket_aligned(start)
        assert billing.is_bucket_aligned(end)
        assert billing.local_day(start, tz).day == 1
