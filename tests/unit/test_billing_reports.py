"""Billing reads: usage reports against the records, CSV = JSON, tenant isolation, statements
(totals, immutability, adjustments), re-rating (dry run, then the rollups), reconciliation."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.management import call_command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from gateway.conf.celery import app as celery_app
from tenancy import billing
from tenancy.models import ApiKey, PriceVersion, Statement, Tenant, UsageRecord, UsageRollup, UsageRollupDay
from tenancy.pricing import Price
from tenancy.reports import ReportQuery, report_rows, usage_report
from tenancy.services import rollups
from tenancy.services.members import member_add
from tenancy.services.prices import price_set
from tenancy.services.statements import statement_close, statement_compute
from tenancy.services.tenants import tenant_details_set
from tenancy.services.tokens import access_token_create
from tenancy.services.usage import usage_records_write

pytestmark = pytest.mark.django_db

# A month with a DST change in Paris (2026-03-29) and records on both sides of midnights.
MONTH_START = datetime(2026, 3, 1, tzinfo=UTC)
NOW = datetime(2026, 5, 10, tzinfo=UTC)


@pytest.fixture
def eager_celery() -> Iterator[None]:
    before = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = before


@pytest.fixture
def world(db: Any) -> dict[str, Any]:
    acme = Tenant.objects.create(slug="acme", name="Acme", time_zone="Europe/Paris", rollup_time_zone="Europe/Paris")
    umbra = Tenant.objects.create(slug="umbra", name="Umbra")
    keys = {
        "acme": ApiKey.objects.create(tenant=acme, prefix="ka", digest="x"),
        "acme2": ApiKey.objects.create(tenant=acme, prefix="kb", digest="x"),
        "umbra": ApiKey.objects.create(tenant=umbra, prefix="ku", digest="x"),
    }
    price = price_set(
        model="m",
        input="2",
        cached_input="1",
        cache_write="3",
        output="8",
        effective_from=MONTH_START - timedelta(days=60),
    )
    return {"acme": acme, "umbra": umbra, "keys": keys, "price": price}


_serial = iter(range(10**9))


def record(
    key: ApiKey, at: datetime, *, model: str = "m", inp: int | None = 1000, out: int | None = 100, **extra: Any
) -> dict[str, Any]:
    return {
        "request_id": f"req-{next(_serial)}",
        "tenant_id": key.tenant_id,
        "api_key_id": key.pk,
        "account_id": None,
        "model": model,
        "status_code": 200,
        "outcome": "completed",
        "latency_ms": 120.0,
        "ttfb_ms": 40.0,
        "created_at": at,
        "input_tokens": inp,
        "cached_tokens": 200 if inp else None,
        "cache_write_tokens": None,
        "output_tokens": out,
        "reasoning_tokens": None,
        "total_tokens": (inp or 0) + (out or 0),
        "cost": None,
        "price_version_id": None,
        **extra,
    }


def client_for(user: User) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {access_token_create(user=user, name='t')[1]}")
    return client


@pytest.fixture
def clients(world: dict[str, Any]) -> dict[str, APIClient]:
    return {
        "operator": client_for(User.objects.create_user("op", is_staff=True)),
        "acme": client_for(member_add(tenant=world["acme"], username="viewer", role="viewer").user),
        "umbra": client_for(member_add(tenant=world["umbra"], username="outsider", role="admin").user),
    }


# Report totals equal a direct sum over the records, whatever the range, granularity and zone.

offsets = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40 * 24 * 4 - 1)), min_size=1, max_size=30)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    placed=offsets,
    first=st.integers(0, 30 * 96),
    length=st.integers(1, 12 * 96),
    granularity=st.sampled_from(["hour", "day", "month"]),
    zone_name=st.sampled_from(["UTC", "Europe/Paris", "Asia/Kathmandu"]),
)
def test_report_buckets_equal_a_direct_sum_over_the_records(
    world: dict[str, Any], placed: list[tuple[int, int]], first: int, length: int, granularity: str, zone_name: str
) -> None:
    UsageRecord.objects.all().delete()
    keys = [world["keys"]["acme"], world["keys"]["acme2"], world["keys"]["umbra"]]
    events = [record(keys[k], MONTH_START + timedelta(minutes=15 * slot, seconds=slot % 800)) for k, slot in placed]
    usage_records_write(events)
    rollups.rollup_period(start=MONTH_START, end=MONTH_START + timedelta(days=41))
    start = MONTH_START + timedelta(minutes=15 * first)
    end = start + timedelta(minutes=15 * length)
    if granularity == "hour" and length > 744 * 4:
        return
    query = ReportQuery(None, start, end, zone_name, granularity, ("tenant", "key"))
    report = usage_report(query, as_of=None)
    tz = billing.zone(zone_name)
    expected: Counter[tuple[int, str, int]] = Counter()
    for e in events:
        if start <= e["created_at"] < end:
            local = billing.period_of(e["created_at"], tz, granularity)
            bucket_start = max(billing.local_to_utc(local, tz), start)
            expected[(int(bucket_start.timestamp()), Tenant.objects.get(pk=e["tenant_id"]).slug, e["api_key_id"])] += 1
    got: Counter[tuple[int, str, int]] = Counter()
    for bucket in report["data"]:
        for result in bucket["results"]:
            got[(bucket["start_time"], result["tenant"], result["api_key_id"])] += result["num_model_requests"]
    assert got == expected
    # Buckets tile the range.
    assert report["data"][0]["start_time"] == int(start.timestamp())
    assert report["data"][-1]["end_time"] == int(end.timestamp())
    for before, after in zip(report["data"], report["data"][1:], strict=False):
        assert before["end_time"] == after["start_time"]


def test_a_month_by_key_and_model_reads_the_day_rows_and_equals_the_buckets(world: dict[str, Any]) -> None:
    key = world["keys"]["acme"]
    usage_records_write([record(key, MONTH_START + timedelta(hours=h, minutes=7)) for h in range(0, 24 * 31, 5)])
    rollups.rollup_period(start=MONTH_START - timedelta(days=1), end=MONTH_START + timedelta(days=32))
    assert UsageRollupDay.objects.filter(tenant=world["acme"], time_zone="Europe/Paris").exists()
    start, end = billing.month_range(2026, 3, billing.zone("Europe/Paris"))
    query = ReportQuery([world["acme"].pk], start, end, "Europe/Paris", "month", ("key", "model"))
    result = usage_report(query, as_of=None)["data"][0]["results"][0]
    expected = UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end, tenant=world["acme"]).count()
    assert result["num_model_requests"] == expected
    assert result["input_tokens"] == 1000 * expected
    assert result["input_cached_tokens"] == 200 * expected
    assert result["price_version_ids"] == [world["price"].pk]
    # cost: 800 uncached at 2, 200 cached at 1, 100 output at 8 per million tokens
    assert Decimal(result["cost_usd"]) == Decimal("0.0026") * expected
    # In UTC (not the day rows' zone) the same month is summed from the 15-minute rows.
    utc = usage_report(
        ReportQuery([world["acme"].pk], MONTH_START, MONTH_START + timedelta(days=31), "UTC", "month", ()), as_of=None
    )
    in_utc = UsageRecord.objects.filter(
        created_at__gte=MONTH_START, created_at__lt=MONTH_START + timedelta(days=31)
    ).count()
    assert utc["data"][0]["results"][0]["num_model_requests"] == in_utc


def test_a_time_zone_change_rebuilds_the_days(
    world: dict[str, Any], eager_celery: None, django_capture_on_commit_callbacks: Any
) -> None:
    key = world["keys"]["umbra"]
    # 23:30 UTC is the next day in Kathmandu (+5:45).
    usage_records_write([record(key, datetime(2026, 3, 3, 23, 30, tzinfo=UTC))])
    rollups.rollup_period(start=MONTH_START, end=MONTH_START + timedelta(days=5))
    assert list(UsageRollupDay.objects.filter(tenant=world["umbra"]).values_list("day", "time_zone")) == [
        (datetime(2026, 3, 3).date(), "UTC")
    ]
    with django_capture_on_commit_callbacks(execute=True):
        tenant_details_set(tenant=world["umbra"], time_zone="Asia/Kathmandu")
    assert list(UsageRollupDay.objects.filter(tenant=world["umbra"]).values_list("day", "time_zone")) == [
        (datetime(2026, 3, 4).date(), "Asia/Kathmandu")
    ]
    world["umbra"].refresh_from_db()
    assert world["umbra"].rollup_time_zone == "Asia/Kathmandu"
    with pytest.raises(ValidationError):
        tenant_details_set(tenant=world["umbra"], time_zone="Mars/Base")


# The API: CSV equals JSON, data as of, tenant isolation.


def _seed(world: dict[str, Any]) -> None:
    events = [
        record(world["keys"][name], MONTH_START + timedelta(days=d, hours=h))
        for name in ("acme", "acme2", "umbra")
        for d in range(0, 10, 3)
        for h in (1, 13, 23)
    ]
    usage_records_write(events)
    rollups.rollup_recent()


REPORT = "/api/v1/reports/usage?from=2026-03-01T00:00:00Z&to=2026-03-11T00:00:00Z&granularity=day"


def test_csv_equals_json(world: dict[str, Any], clients: dict[str, APIClient]) -> None:
    _seed(world)
    url = REPORT + "&group_by=tenant,key,model&percentiles=true"
    as_json = clients["operator"].get(url)
    as_csv = clients["operator"].get(url + "&format=csv")
    assert as_json.status_code == as_csv.status_code == 200
    assert as_csv["Content-Type"].startswith("text/csv")
    parsed = list(csv.DictReader(io.StringIO(as_csv.content.decode())))
    rows = report_rows(as_json.json())
    assert len(parsed) == len(rows) > 0
    for line, row in zip(parsed, rows, strict=True):
        for name, value in row.items():
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            shown = "" if shown is None else ("true" if shown is True else "false" if shown is False else str(shown))
            assert line[name] == shown, name
    assert as_json.json()["data_as_of"] is not None
    assert as_json["X-Data-As-Of"] == as_json.json()["data_as_of"]
    # A statement too: one CSV row per line item and adjustment, then the total.
    url = f"/api/v1/tenants/{world['acme'].pk}/statement/?month=2026-03"
    statement = clients["operator"].get(url).json()
    lines = list(csv.DictReader(io.StringIO(clients["operator"].get(url + "&format=csv").content.decode())))
    assert [line["section"] for line in lines] == ["line"] * len(statement["lines"]) + ["total"]
    for line, item in zip(lines, statement["lines"], strict=False):
        assert (line["model"], line["kind"], line["tokens"], line["amount_usd"]) == (
            item["model"],
            item["kind"],
            str(item["tokens"]),
            item["amount_usd"],
        )
    assert lines[-1]["amount_usd"] == statement["totals"]["total_usd"]
    # A bucket looks like OpenAI's usage API's.
    page = as_json.json()
    assert page["object"] == "page"
    assert {"object", "start_time", "end_time", "results"} <= set(page["data"][0])


def test_every_report_endpoint_is_tenant_scoped(world: dict[str, Any], clients: dict[str, APIClient]) -> None:
    _seed(world)
    acme, umbra, operator = clients["acme"], clients["umbra"], clients["operator"]
    # A tenant sees its own usage only; asking for another's is a 404.
    mine = umbra.get(REPORT + "&group_by=tenant").json()
    assert {r["tenant"] for b in mine["data"] for r in b["results"]} == {"umbra"}
    assert umbra.get(REPORT + "&tenant=acme").status_code == 404
    assert umbra.get(REPORT + "&tenant=acme&format=csv").status_code == 404
    assert {r["tenant"] for b in operator.get(REPORT + "&group_by=tenant").json()["data"] for r in b["results"]} == {
        "acme",
        "umbra",
    }
    # The acme member's report defaults to acme's time zone.
    assert acme.get(REPORT).json()["time_zone"] == "Europe/Paris"
    # Statements: the month's statement, closed statements, their list.
    month = f"/api/v1/tenants/{world['acme'].pk}/statement/?month=2026-03"
    assert umbra.get(month).status_code == 404
    assert umbra.get(month + "&format=csv").status_code == 404
    assert acme.get(month).status_code == 200
    closed = statement_close(tenant=world["acme"], month="2026-03", now=NOW)
    assert umbra.get(f"/api/v1/statements/{closed.pk}/").status_code == 404
    assert umbra.get("/api/v1/statements/").json()["results"] == []
    assert umbra.get("/api/v1/statements/?tenant=acme").status_code == 404
    assert [s["month"] for s in acme.get("/api/v1/statements/").json()["results"]] == ["2026-03"]
    # Reconciliation and the re-rating dry run are for operators.
    assert umbra.get("/api/v1/reports/reconciliation").status_code == 403
    assert acme.post("/api/v1/prices/preview/", {}, format="json").status_code == 403


def test_bad_report_parameters_are_400s(world: dict[str, Any], clients: dict[str, APIClient]) -> None:
    operator = clients["operator"]
    for query, field in (
        ("?from=2026-03-01T00:07:00Z&to=2026-03-02T00:00:00Z", "from"),
        ("?from=2026-03-02T00:00:00Z&to=2026-03-01T00:00:00Z", "to"),
        ("?from=2026-03-01T00:00:00Z&to=2026-03-02T00:00:00Z&granularity=week", "granularity"),
        ("?from=2026-03-01T00:00:00Z&to=2026-03-02T00:00:00Z&group_by=color", "group_by"),
        ("?from=2026-01-01T00:00:00Z&to=2026-03-02T00:00:00Z&granularity=hour", "to"),
        ("?from=2026-03-01T00:00:00Z&to=2026-03-02T00:00:00Z&time_zone=Nowhere/Land", "time_zone"),
        ("?from=yesterday", "from"),
    ):
        answer = operator.get("/api/v1/reports/usage" + query)
        assert answer.status_code == 400, query
        assert field in answer.json(), query


# Statements.


def test_statement_totals_immutability_and_adjustments(world: dict[str, Any]) -> None:
    acme, key = world["acme"], world["keys"]["acme"]
    tz = billing.zone(acme.time_zone)
    march = billing.month_range(2026, 3, tz)
    # 23:30 UTC on March 31 is April 1 in Paris: in April's statement, not March's.
    usage_records_write(
        [
            record(key, march[0] + timedelta(hours=1)),
            record(key, march[0] + timedelta(days=10), out=5000),
            record(key, datetime(2026, 3, 31, 23, 30, tzinfo=UTC)),
            record(key, march[0] + timedelta(days=3), inp=None),
        ]
    )
    rollups.rollup_recent()
    open_statement = statement_compute(acme, "2026-03")
    assert open_statement["closed"] is False
    totals = open_statement["totals"]
    assert totals["requests"] == 3
    assert totals["unknown_usage_requests"] == 1
    assert totals["amount_pusd"] == sum(line["amount_pusd"] for line in open_statement["lines"])
    rollup_cost = sum(
        UsageRollup.objects.filter(tenant=acme, bucket_start__gte=march[0], bucket_start__lt=march[1]).values_list(
            "cost_pusd", flat=True
        )
    )
    assert totals["amount_pusd"] == rollup_cost
    # 800 uncached x 2 + 200 cached x 1, twice; 100 x 8 + 5000 x 8 output (micro-USD per token x tokens = pico-USD)
    assert rollup_cost == (800 * 2 + 200 * 1) * 2 * 10**6 + (100 + 5000) * 8 * 10**6
    assert open_statement["price_version_ids"] == [world["price"].pk]

    with pytest.raises(ValidationError):  # not ended yet
        statement_close(tenant=acme, month="2026-03", now=datetime(2026, 3, 31, 12, tzinfo=UTC))
    closed = statement_close(tenant=acme, month="2026-03", now=NOW)
    assert closed.totals["amount_pusd"] == rollup_cost
    with pytest.raises(PermissionError):
        closed.save()
    with pytest.raises(PermissionError):
        closed.delete()
    with pytest.raises(PermissionError):
        Statement.objects.filter(pk=closed.pk).update(month="2026-02")
    with pytest.raises(PermissionError):
        Statement.objects.filter(pk=closed.pk).delete()
    with pytest.raises(ValidationError):
        statement_close(tenant=acme, month="2026-03", now=NOW)

    # A late record of March: March's statement stays as closed; April's carries it.
    late = record(key, march[0] + timedelta(days=20))
    usage_records_write([late])
    rollups.rollup_recent()
    assert statement_compute(acme, "2026-03")["totals"]["amount_pusd"] == rollup_cost
    april = statement_compute(acme, "2026-04")
    late_cost = (800 * 2 + 200 * 1 + 100 * 8) * 10**6
    assert sum(a["amount_pusd"] for a in april["adjustments"]) == late_cost
    assert {a["month"] for a in april["adjustments"]} == {"2026-03"}
    assert april["totals"]["total_pusd"] == april["totals"]["amount_pusd"] + late_cost
    # Closing April freezes the adjustment; May does not carry it again.
    statement_close(tenant=acme, month="2026-04", now=NOW)
    assert statement_compute(acme, "2026-05")["adjustments"] == []
    with pytest.raises(ValidationError):  # months close in order
        statement_close(tenant=acme, month="2026-02", now=NOW)


def test_statement_close_needs_complete_rollups(world: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="roll up first"):
        statement_close(tenant=world["acme"], month="2026-03", now=NOW)


# Re-rating.


def test_rerating_dry_run_then_recompute(
    world: dict[str, Any], eager_celery: None, django_capture_on_commit_callbacks: Any, clients: dict[str, APIClient]
) -> None:
    acme_key, umbra_key = world["keys"]["acme"], world["keys"]["umbra"]
    usage_records_write(
        [record(acme_key, MONTH_START + timedelta(days=d)) for d in (1, 5, 9)]
        + [record(umbra_key, MONTH_START + timedelta(days=d)) for d in (2, 8)]
    )
    rollups.rollup_recent()
    old_cost = (800 * 2 + 200 * 1 + 100 * 8) * 10**6  # pico-USD per record
    body = {
        "model": "m",
        "input": "4",
        "cached_input": "1",
        "cache_write": "3",
        "output": "8",
        "effective_from": "2026-03-04T00:00:00Z",
    }
    dry = clients["operator"].post("/api/v1/prices/preview/", body, format="json")
    assert dry.status_code == 200
    by_tenant = {t["tenant"]: t for t in dry.json()["tenants"]}
    # From March 4: acme's records of days 5 and 9, umbra's of day 8; 800 more uncached tokens at +2.
    assert Decimal(by_tenant["acme"]["difference_usd"]) == Decimal(2 * 800 * 2) / 10**6
    assert Decimal(by_tenant["umbra"]["difference_usd"]) == Decimal(800 * 2) / 10**6
    assert by_tenant["acme"]["new_price_version_ids"] == ["new"]
    assert by_tenant["acme"]["current_price_version_ids"] == [world["price"].pk]
    assert UsageRollup.objects.filter(price_version=world["price"]).count() == 5  # nothing written
    # The command's dry run says the same, and saves nothing either.
    out = io.StringIO()
    flags = ["--input", "4", "--cached-input", "1", "--cache-write", "3", "--output", "8"]
    call_command("price_set", "m", *flags, "--effective-from", "2026-03-04", "--dry-run", stdout=out)
    assert "Dry run: nothing saved" in out.getvalue()
    assert f"acme: {by_tenant['acme']['current_cost_usd']} -> {by_tenant['acme']['new_cost_usd']} USD" in out.getvalue()
    assert PriceVersion.objects.filter(model="m").count() == 1

    with django_capture_on_commit_callbacks(execute=True):
        new = price_set(
            model="m",
            effective_from=datetime(2026, 3, 4, tzinfo=UTC),
            **{k: body[k] for k in ("input", "cached_input", "cache_write", "output")},
        )
    costs = dict(UsageRollup.objects.values_list("tenant__slug").annotate().values_list("tenant__slug", "cost_pusd"))
    assert costs  # re-rated rows exist
    acme_rows = UsageRollup.objects.filter(tenant=world["acme"])
    assert sorted(acme_rows.values_list("price_version_id", flat=True)) == sorted([world["price"].pk, new.pk, new.pk])
    assert sum(acme_rows.values_list("cost_pusd", flat=True)) == 3 * old_cost + 2 * 800 * 2 * 10**6
    # The raw records keep the cost they were priced with at request time.
    assert UsageRecord.objects.filter(price_version=new).count() == 0
    # Each figure says which versions it used.
    report = usage_report(
        ReportQuery(None, MONTH_START, MONTH_START + timedelta(days=10), "UTC", "month", ("tenant",)), as_of=None
    )
    versions = {r["tenant"]: r["price_version_ids"] for r in report["data"][0]["results"]}
    assert versions == {"acme": sorted([world["price"].pk, new.pk]), "umbra": sorted([world["price"].pk, new.pk])}
    # A second dry run of the same version changes nothing more.
    again = rollups.rerate_preview(
        Price(0, "m", Decimal(4), Decimal(1), Decimal(3), Decimal(8), None, datetime(2026, 3, 4, tzinfo=UTC))
    )
    assert {t["difference_usd"] for t in again["tenants"]} == {"0E-12"}


# Reconciliation.


def test_reconciliation_flags_unknown_usage_and_compares_attempts(
    world: dict[str, Any], clients: dict[str, APIClient]
) -> None:
    from accounts.services import pool_get_or_create, upstream_account_create

    pool = pool_get_or_create(name="main")
    first, second = (
        upstream_account_create(pool=pool, base_url=f"http://127.0.0.1:9/v{n}", models=["m"], api_key="sk-x").pk
        for n in (1, 2)
    )
    key = world["keys"]["acme"]
    at = MONTH_START + timedelta(hours=3)
    failed = {
        "account_id": second,
        "outcome": "upstream_error",
        "status": 502,
        "input_tokens": 50,
        "output_tokens": 0,
        "total_tokens": 50,
    }
    usage_records_write(
        [record(key, at, account_id=first, attempts=[failed]), record(key, at, account_id=first, inp=None, out=None)]
    )
    rollups.rollup_recent()
    answer = clients["operator"].get("/api/v1/reports/reconciliation?from=2026-03-01T00:00:00Z&to=2026-03-02T00:00:00Z")
    assert answer.status_code == 200
    rows = {row["account_id"]: row for row in answer.json()["data"]}
    assert rows[first]["metered_tokens"] == rows[first]["reported_tokens"] == 1100
    assert rows[first]["unknown_usage_records"] == 1
    assert len(rows[first]["unknown_usage_request_ids"]) == 1
    assert rows[second]["metered_tokens"] == rows[second]["reported_tokens"] == 50
    assert rows[second]["metered_attempts"] == 1
    assert all(row["matches"] for row in rows.values())
    # A record no rollup has seen yet shows up as a difference.
    usage_records_write([record(key, at, account_id=first)])
    rows = {
        r["account_id"]: r
        for r in clients["operator"]
        .get("/api/v1/reports/reconciliation?from=2026-03-01T00:00:00Z&to=2026-03-02T00:00:00Z")
        .json()["data"]
    }
    assert rows[first]["difference_tokens"] == -1100
    assert rows[first]["matches"] is False
