"""The request log and the audit log sorted by their column headers (docs/console.md, "Sorting").

Every order is walked page by page to its end and back again, and must list each row once in
the order Python computes (ties broken by id, unknown values last in both directions), with
filters, for a member of two tenants (one query per tenant, merged) and for an order no index
serves (a model filter: bounded by a date range and a cap). Each order with a tenant is read
through an index, with no sort step in the plan. (Bad ``sort`` and cursor values:
tests/unit/test_console_bad_input.py; outsiders: tests/unit/test_console_pages.py.)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tenancy import selectors
from tenancy.models import AuditEntry, Membership, Role, Tenant, UsageRecord
from tenancy.services.members import member_add
from tenancy.services.tenants import tenant_create
from tests.console import acme_with_people, signed_in_client

pytestmark = pytest.mark.django_db
PASSWORD = "a-long-enough-password-42"
PAGE = 50
STATUSES = (200, 429, 500, 502, 200)


@pytest.fixture(autouse=True)
def _clear() -> None:
    cache.clear()


signed_in = functools.partial(signed_in_client, password=PASSWORD)


@pytest.fixture
def acme() -> Tenant:
    return acme_with_people(PASSWORD)


def seed(tenant: Tenant, count: int, *, model: str = "gpt-4.1") -> list[UsageRecord]:
    """``count`` records with ties in every column and unknown costs and tokens."""
    now = timezone.now()
    rows = []
    for n in range(count):
        unknown = n % 9 == 0
        rows.append(
            UsageRecord.objects.create(
                request_id=f"req_{tenant.slug}_{n}",
                tenant=tenant,
                model=model,
                status_code=STATUSES[n % len(STATUSES)],
                outcome="completed",
                latency_ms=float(n % 7) * 1.5,
                total_tokens=None if unknown else (n * 37) % 11,
                cost=None if unknown else Decimal((n * 13) % 5) / 1000,
                created_at=now - timedelta(seconds=n // 3),  # three records a second: ties
            )
        )
    return rows


FIELDS = {"time": "created_at", "latency": "latency_ms", "cost": "cost", "tokens": "total_tokens"}
FIELDS["status"] = "status_code"


def three_days_old(tenant: Tenant, request_id: str, **fields: Any) -> UsageRecord:
    """A completed request of ``tenant`` three days ago (outside the default range of a sort)."""
    created_at = timezone.now() - timedelta(days=3)
    return UsageRecord.objects.create(
        request_id=request_id, tenant=tenant, status_code=200, outcome="completed", created_at=created_at, **fields
    )


def expected(rows: list[UsageRecord], sort: str) -> list[str]:
    """The request ids of ``rows`` in the order ``sort`` names (unknown values last)."""
    field, descending = FIELDS[sort.removeprefix("-")], sort.startswith("-")
    known = [r for r in rows if getattr(r, field) is not None]
    unknown = [r for r in rows if getattr(r, field) is None]
    known.sort(key=lambda r: (getattr(r, field), r.pk), reverse=descending)
    unknown.sort(key=lambda r: r.pk, reverse=descending)
    return [r.request_id for r in known + unknown]


def request_ids(html: str) -> list[str]:
    return re.findall(r"<code>(req_[a-z]+_\d+)</code></a>", html)


def link(html: str, rel: str) -> str | None:
    found = re.search(rf'href="(\?[^"]*)" rel="{rel}"', html)
    return found.group(1).replace("&amp;", "&") if found else None


def walk(client: Client, path: str, query: str, ids: Callable[[str], list[str]]) -> list[list[str]]:
    """Every page from the first, following "Next", then back from the last following
    "Previous": the pages going forward (asserting the way back shows the same pages)."""
    forward: list[list[str]] = []
    htmls: list[str] = []
    url: str | None = query
    while url is not None:
        response = client.get(path + url)
        assert response.status_code == 200, response.content.decode()
        html = response.content.decode()
        forward.append(ids(html))
        htmls.append(html)
        url = link(html, "next")
        assert len(forward) < 50
    assert link(htmls[0], "prev") is None
    back = link(htmls[-1], "prev")
    for page in reversed(forward[:-1]):
        assert back is not None
        html = client.get(path + back).content.decode()
        assert ids(html) == page
        back = link(html, "prev")
    assert back is None
    return forward


def flat(pages: list[list[str]]) -> list[str]:
    return [row for page in pages for row in page]


SORTS = [f"{sign}{name}" for name in FIELDS for sign in ("", "-")]


@pytest.mark.parametrize("sort", SORTS)
def test_every_order_of_the_request_log_pages_both_ways(acme: Tenant, sort: str) -> None:
    rows = seed(acme, 2 * PAGE + 17)
    pages = walk(signed_in("vera"), "/console/requests/", f"?sort={sort}", request_ids)
    assert [len(page) for page in pages] == [PAGE, PAGE, 17]
    assert flat(pages) == expected(rows, sort)


@pytest.mark.parametrize("sort", ["-latency", "cost", "-tokens", "status", "time"])
def test_an_order_with_a_tenant_and_a_status_filter(acme: Tenant, sort: str) -> None:
    rows = seed(acme, 2 * PAGE + 5)
    seed(tenant_create(slug="other", name="Other"), 30)
    pages = walk(signed_in("olga"), "/console/requests/", f"?tenant=acme&sort={sort}", request_ids)
    assert flat(pages) == expected(rows, sort)
    # a status filter in an order other than time: no index, a bounded range (the last day)
    errors = [r for r in rows if r.status_code == 500]
    pages = walk(signed_in("olga"), "/console/requests/", f"?tenant=acme&status=500&sort={sort}", request_ids)
    assert flat(pages) == expected(errors, sort)


def test_a_member_of_two_tenants_reads_both_merged_in_order(acme: Tenant) -> None:
    other = tenant_create(slug="other", name="Other")
    member_add(tenant=other, username="owen", role=Role.VIEWER, password=PASSWORD)
    rows = seed(acme, PAGE + 3) + seed(other, PAGE - 8)
    seed(tenant_create(slug="third", name="Third"), 20)  # not owen's
    for sort in ("-latency", "cost", "-time", "time"):
        client = signed_in("owen")
        with CaptureQueriesContext(connection) as queries:
            client.get(f"/console/requests/?sort={sort}")
        reads = [q["sql"] for q in queries.captured_queries if "usagerecord" in q["sql"].lower()]
        if sort.endswith("time"):
            assert len(reads) == 2, reads  # one per tenant, each an index range
        else:  # no index: the range's start, the count up to the cap, the sorted page
            assert len(reads) == 3, reads
        pages = walk(client, "/console/requests/", f"?sort={sort}", request_ids)
        assert flat(pages) == expected(rows, sort)


def test_an_order_no_index_serves_covers_a_bounded_date_range(acme: Tenant, monkeypatch: Any) -> None:
    rows = seed(acme, 12, model="gpt-other") + seed(tenant_create(slug="b", name="B"), 5, model="gpt-other")
    old = three_days_old(acme, "req_acme_900", model="gpt-other", latency_ms=99.0)
    client = signed_in("olga")
    page = client.get("/console/requests/?model=gpt-other&sort=-latency")
    html = page.content.decode()
    assert page.status_code == 200
    assert "No index sorts requests by latency: this page sorts the requests of" in html
    assert request_ids(html) == expected(rows, "-latency")  # the last day only: not the old one
    since = (timezone.now() - timedelta(days=4)).date().isoformat()
    wider = client.get(f"/console/requests/?model=gpt-other&sort=-latency&from={since}").content.decode()
    assert request_ids(wider) == expected([old, *rows], "-latency")
    # a member of one tenant sorting that way reads that tenant's records only
    mine = signed_in("owen").get(f"/console/requests/?model=gpt-other&sort=latency&from={since}")
    assert request_ids(mine.content.decode()) == expected([old, *rows[:12]], "latency")
    monkeypatch.setattr(selectors, "UNINDEXED_SORT_CAP", 10)
    refused = client.get(f"/console/requests/?model=gpt-other&sort=-latency&from={since}")
    assert refused.status_code == 400
    assert re.search(r'id="f-from-errors" role="alert"><li>more than 10 requests match', refused.content.decode())
    assert request_ids(refused.content.decode()) == []
    # by time the same filter is index-served: no range, no cap
    assert len(request_ids(client.get("/console/requests/?model=gpt-other").content.decode())) == 18


def test_the_headers_are_links_with_aria_sort_and_keep_the_filters(acme: Tenant) -> None:
    seed(acme, 3)
    html = signed_in("owen").get("/console/requests/?sort=-latency&model=gpt-4.1&from=2026-01-01").content.decode()
    header = re.search(r"<thead>.*?</thead>", html, re.S)
    assert header is not None
    cells = re.findall(r"<th [^>]*>.*?</th>", header.group(0))
    sorted_cells = [cell for cell in cells if "aria-sort" in cell]
    assert len(sorted_cells) == 1
    assert 'aria-sort="descending"' in sorted_cells[0]
    assert ">Latency (ms)</a>" in sorted_cells[0]
    assert 'href="?sort=latency&amp;model=gpt-4.1&amp;from=2026-01-01"' in sorted_cells[0]  # flips
    assert 'href="?sort=-cost&amp;model=gpt-4.1&amp;from=2026-01-01"' in html  # costliest first
    assert '<caption class="visually-hidden">Requests, by latency, slowest first</caption>' in html
    assert '<input type="hidden" name="sort" value="-latency">' in html  # filtering keeps the order
    default = signed_in("owen").get("/console/requests/").content.decode()
    assert re.search(r'<th scope="col" aria-sort="descending"><a class="sort" href="\?sort=time">Time', default)


def test_a_sorted_page_with_a_tenant_is_one_index_read_with_no_sort_step(acme: Tenant) -> None:
    seed(acme, 5)
    client = signed_in("owen")
    for sort in ("-time", "time"):  # the only order with an index (the others sort a date range)
        with CaptureQueriesContext(connection) as queries:
            assert client.get(f"/console/requests/?tenant=acme&sort={sort}").status_code == 200
        reads = [q["sql"] for q in queries.captured_queries if "usagerecord" in q["sql"].lower()]
        assert len(reads) == 1
        for sql in reads:
            assert re.search(r"LIMIT \d+$", sql)
            assert "COUNT(" not in sql.upper()
            assert "OFFSET" not in sql.upper()
            plan = explain(sql)
            assert "SORT" not in plan.upper().replace("SORT KEY", ""), (sort, plan)


def explain(sql: str) -> str:
    """The plan of ``sql`` with sorting made as dear as the database allows, so a sort step in
    it means no index gives the order (PostgreSQL: also no sequential scans, as on a big table)."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL enable_sort = off")
            cursor.execute("SET LOCAL enable_seqscan = off")
            cursor.execute("EXPLAIN " + sql)
            return "\n".join(row[0] for row in cursor.fetchall()).replace("Merge Append", "")
        cursor.execute("EXPLAIN QUERY PLAN " + sql)
        return "\n".join(str(row[-1]) for row in cursor.fetchall()).replace("TEMP B-TREE FOR", "SORT:")


# --- the audit log ---------------------------------------------------------------------------


def audit_seed(tenant: Tenant, count: int) -> list[AuditEntry]:
    actors = ("zoe", "ann", "bob", "mia", "ann")
    actions = ("apikey.create", "apikey.revoke", "member.add")
    entries = []
    for n in range(count):
        entry = AuditEntry(
            actor_label=actors[n % len(actors)],
            source="console",
            tenant_id=tenant.pk,
            action=actions[n % len(actions)],
            target_type="thing",
            target_id=f"t{n}",
        )
        entry.save()
        entries.append(entry)
    return entries


def targets(html: str) -> list[str]:
    return re.findall(r"<td>thing (t\d+)</td>", html)


AUDIT_FIELDS = {"time": "pk", "actor": "actor_label", "action": "action"}


def audit_expected(entries: list[AuditEntry], sort: str) -> list[str]:
    field, descending = AUDIT_FIELDS[sort.removeprefix("-")], sort.startswith("-")
    ordered = sorted(entries, key=lambda e: (getattr(e, field), e.pk), reverse=descending)
    return [e.target_id for e in ordered]


@pytest.mark.parametrize("sort", [f"{sign}{name}" for name in AUDIT_FIELDS for sign in ("", "-")])
def test_every_order_of_the_audit_log_pages_both_ways(acme: Tenant, sort: str) -> None:
    quiet = Tenant.objects.create(slug="quiet", name="Quiet")  # no audited change of its own
    Membership.objects.create(user=User.objects.create_user("quinn", password=PASSWORD), tenant=quiet, role=Role.OWNER)
    entries = audit_seed(quiet, PAGE + 21)
    audit_seed(acme, 10)  # not quinn's
    owner = signed_in("quinn")
    pages = walk(owner, "/console/audit/", f"?sort={sort}", targets)
    assert [len(page) for page in pages] == [PAGE, 21]
    assert flat(pages) == audit_expected(entries, sort)
    creates = [e for e in entries if e.action == "apikey.create"]
    pages = walk(owner, "/console/audit/", f"?action=apikey.create&tenant=quiet&sort={sort}", targets)
    assert flat(pages) == audit_expected(creates, sort)


def test_a_viewer_sorting_the_audit_log_sees_nothing_and_no_button(acme: Tenant) -> None:
    audit_seed(acme, 5)
    for sort in ("actor", "-action", "time"):
        html = signed_in("vera").get(f"/console/audit/?sort={sort}").content.decode()
        assert targets(html) == []
        assert 'data-write="1"' not in html


def test_tokens_have_no_index_and_sort_the_last_day_by_default(acme: Tenant) -> None:
    rows = seed(acme, 9)
    three_days_old(acme, "req_acme_old", model="gpt-4.1", latency_ms=5.0, total_tokens=10**6)
    page = signed_in("olga").get("/console/requests/?sort=-tokens")
    html = page.content.decode()
    assert page.status_code == 200
    assert "No index sorts requests by tokens: this page sorts the requests of" in html
    assert request_ids(html) == expected(rows, "-tokens")  # the old record is outside the last day


def test_without_a_from_the_default_range_holds_the_newest_requests_up_to_the_cap(
    acme: Tenant, monkeypatch: Any
) -> None:
    rows = seed(acme, 25)
    monkeypatch.setattr(selectors, "UNINDEXED_SORT_CAP", 10)
    monkeypatch.setattr("tenancy.console.logs.UNINDEXED_SORT_CAP", 10)
    page = signed_in("olga").get("/console/requests/?sort=-latency")
    html = page.content.decode()
    assert page.status_code == 200  # the last day holds 25: the newest 10 are sorted, no error
    boundary = sorted(r.created_at for r in rows)[-10]  # the 10th newest time: those after it
    newest = [r for r in rows if r.created_at > boundary]
    assert 0 < len(newest) < 10
    assert request_ids(html) == expected(newest, "-latency")
    assert "by default the last day or its newest 10" in html
