"""The console's read-only pages: the request log and one request, the audit log, usage.

(Outsiders getting 404 on each: tests/unit/test_console_pages.py's table.)
"""

from __future__ import annotations

import csv
import io
import re
from datetime import timedelta
from typing import Any

import pytest
from django.core.cache import cache
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tenancy.models import Tenant, UsageRecord
from tenancy.services.keys import apikey_create, apikey_revoke
from tenancy.services.rollups import rollup_period
from tenancy.services.tenants import tenant_create
from tests.console import acme_with_people, signed_in_client

pytestmark = pytest.mark.django_db
PASSWORD = "a-long-enough-password-42"


@pytest.fixture(autouse=True)
def _clear() -> None:
    cache.clear()


def signed_in(username: str) -> Client:
    return signed_in_client(username, PASSWORD)


def record(tenant: Tenant, n: int, **fields: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "request_id": f"req_{tenant.slug}_{n}",
        "tenant": tenant,
        "model": "gpt-4.1",
        "status_code": 200,
        "outcome": "completed",
        "latency_ms": 12.0,
        "ttfb_ms": 3.0,
        "input_tokens": 10,
        "output_tokens": 5,
        "total_tokens": 15,
        "created_at": timezone.now() - timedelta(seconds=n),
        **fields,
    }
    return UsageRecord.objects.create(**values)


@pytest.fixture
def acme() -> Tenant:
    return acme_with_people(PASSWORD)


def request_ids(html: str) -> list[str]:
    return re.findall(r"<code>(req_[a-z]+_\d+)</code></a>", html)


def test_the_request_log_is_newest_first_with_keyset_pages(acme: Tenant) -> None:
    for n in range(60):
        record(acme, n)
    client = signed_in("vera")  # a viewer reads the log
    first = client.get("/console/requests/")
    assert first.status_code == 200
    ids = request_ids(first.content.decode())
    assert ids == [f"req_acme_{n}" for n in range(50)]
    older = re.search(r'href="(\?[^"]*after=[^"]+)" rel="next"', first.content.decode())
    assert older is not None
    second = client.get("/console/requests/" + older.group(1).replace("&amp;", "&"))
    assert request_ids(second.content.decode()) == [f"req_acme_{n}" for n in range(50, 60)]
    assert 'rel="next"' not in second.content.decode()
    newer = re.search(r'href="(\?[^"]*before=[^"]+)" rel="prev"', second.content.decode())
    assert newer is not None
    back = client.get("/console/requests/" + newer.group(1).replace("&amp;", "&"))
    assert request_ids(back.content.decode()) == ids


def test_a_page_of_the_log_is_one_query_with_no_count(acme: Tenant) -> None:
    for n in range(5):
        record(acme, n)
    client = signed_in("olga")
    with CaptureQueriesContext(connection) as queries:
        assert client.get("/console/requests/?model=gpt-4.1").status_code == 200
    log_queries = [q["sql"] for q in queries.captured_queries if "usagerecord" in q["sql"].lower()]
    assert len(log_queries) == 1
    assert "COUNT(" not in log_queries[0].upper()
    assert "LIMIT 51" in log_queries[0].upper()


def test_filters_and_the_search_by_request_id(acme: Tenant) -> None:
    key, _ = apikey_create(tenant=acme, name="k")
    record(acme, 1, api_key=key, status_code=429, outcome="rate_limited")
    record(acme, 2, model="gpt-other")
    record(acme, 3)
    client = signed_in("owen")
    assert request_ids(client.get("/console/requests/?request_id=req_acme_2").content.decode()) == ["req_acme_2"]
    assert request_ids(client.get("/console/requests/?status=429").content.decode()) == ["req_acme_1"]
    assert request_ids(client.get(f"/console/requests/?key={key.pk}").content.decode()) == ["req_acme_1"]
    assert request_ids(client.get("/console/requests/?model=gpt-other").content.decode()) == ["req_acme_2"]
    empty = client.get("/console/requests/?request_id=req_nope").content.decode()
    assert "No request matches these filters." in empty


def test_one_request_shows_its_tokens_timings_and_attempts(acme: Tenant) -> None:
    attempt = {"account_id": 7, "outcome": "upstream_error", "status": 502, "total_tokens": None}
    record(acme, 1, attempts=[attempt], response_id="resp_1", cost="0.000123")
    page = signed_in("vera").get("/console/requests/req_acme_1/")
    assert page.status_code == 200
    html = page.content.decode()
    for text in ("resp_1", "0.000123", "12.0 ms", "3.0 ms", "upstream_error", "502", "input tokens"):
        assert text in html, text
    assert signed_in("vera").get("/console/requests/req_nope/").status_code == 404


def test_members_see_only_their_tenants_requests(acme: Tenant) -> None:
    other = tenant_create(slug="other", name="Other")
    record(acme, 1)
    record(other, 1)
    mine = request_ids(signed_in("owen").get("/console/requests/").content.decode())
    assert mine == ["req_acme_1"]
    everything = request_ids(signed_in("olga").get("/console/requests/").content.decode())
    assert sorted(everything) == ["req_acme_1", "req_other_1"]
    assert signed_in("owen").get("/console/requests/req_other_1/").status_code == 404


def test_the_audit_log_shows_who_changed_what_to_managers_only(acme: Tenant) -> None:
    key, _ = apikey_create(tenant=acme, name="to revoke")
    apikey_revoke(api_key=key)
    owner = signed_in("owen").get("/console/audit/").content.decode()
    assert "<code>apikey.revoke</code>" in owner
    assert "<code>apikey.create</code>" in owner
    viewer = signed_in("vera").get("/console/audit/").content.decode()
    assert "<code>apikey.revoke</code>" not in viewer
    assert "No change recorded" in viewer
    only = signed_in("olga").get("/console/audit/?action=apikey.revoke").content.decode()
    assert "<code>apikey.revoke</code>" in only
    assert "<code>apikey.create</code>" not in only


def test_usage_reads_the_rollups_and_the_csv_has_the_same_rows(acme: Tenant) -> None:
    now = timezone.now()
    for n in range(3):
        record(acme, n, created_at=now - timedelta(hours=1, minutes=n))
    start = (now - timedelta(days=1)).replace(minute=0, second=0, microsecond=0)
    rollup_period(start=start, end=now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1))
    client = signed_in("owen")
    page = client.get("/console/usage/?range=7d&group_by=tenant&group_by=model")
    assert page.status_code == 200
    html = page.content.decode()
    assert re.search(r"<dt>Requests</dt><dd>3</dd>", html)
    assert re.search(r"<dt>Input tokens</dt><dd>30</dd>", html)
    exported = client.get("/console/usage/?range=7d&group_by=tenant&group_by=model&format=csv")
    assert exported["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.content.decode())))
    assert sum(int(row["num_model_requests"]) for row in rows) == 3
    assert {row["tenant"] for row in rows} == {"acme"}
    assert {row["model"] for row in rows} == {"gpt-4.1"}


def test_one_request_is_read_by_its_id_alone_with_no_order(acme: Tenant) -> None:
    """No ORDER BY and no join: nothing lets the database walk another index looking for it
    (``.first()``'s ``ORDER BY id LIMIT 1`` walked the primary key: 445 ms on 3M records)."""
    key, _ = apikey_create(tenant=acme, name="k")
    record(acme, 1, api_key=key)
    client = signed_in("owen")
    with CaptureQueriesContext(connection) as queries:
        page = client.get("/console/requests/req_acme_1/")
    assert page.status_code == 200
    assert key.prefix in page.content.decode()
    reads = [q["sql"].upper() for q in queries.captured_queries if "TENANCY_USAGERECORD" in q["sql"].upper()]
    assert len(reads) == 1
    assert "ORDER BY" not in reads[0]
    assert "JOIN" not in reads[0]
    assert '"REQUEST_ID" = ' in reads[0]
