"""Bad input in the query string is never a 500: the console's pages show an error next to the
field (a 400), the management API answers 400 naming the parameter.

Cases: unreadable and out-of-range dates, NUL characters in every filter and search field, a
forged or damaged keyset cursor, non-numeric and out-of-range ids, unknown sort fields and huge
page numbers (both harmless: the default order, the last page).
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from tenancy.models import Role, Tenant, UsageRecord
from tenancy.services.members import member_add
from tenancy.services.tenants import tenant_create
from tenancy.services.tokens import access_token_create

pytestmark = pytest.mark.django_db
BIG = "9" * 30
FORGED_CURSORS = [
    "garbage",
    "2026-01-01T00:00:00+00:00,abc",
    "2026-01-01T00:00:00+00:00," + BIG,
    "not-a-date,12",
    "2026-13-45T00:00:00+00:00,12",
    "0001-01-01T00:00:00-14:00,1",
    "2026-01-01T00:00:00%2B00:00%00,1",
    ",",
    "-time,2026-01-01T00:00:00+00:00",  # no id
    "2026-01-01T00:00:00+00:00,12",  # the cursor of before sorting: no order named
    "-time,2026-01-01T00:00:00+00:00,12,",
    "-latency,1.5,12",  # another order's
    "time,2026-01-01T00:00:00+00:00,12",  # the other direction's
]
BAD_SORTS = ["nope", "-nope", "--time", "-", "time%00", "t" * 40, "%C2%B2"]


@pytest.fixture(autouse=True)
def world() -> None:
    cache.clear()
    tenant = tenant_create(slug="acme", name="Acme")
    member_add(tenant=tenant, username="owen", role=Role.OWNER)
    User.objects.create_user("olga", is_staff=True)
    UsageRecord.objects.create(
        request_id="req_1",
        tenant=tenant,
        model="m",
        status_code=200,
        outcome="completed",
        latency_ms=5.0,
        created_at=timezone.now() - timedelta(minutes=1),
    )


def console(username: str = "olga") -> Client:
    client = Client()
    client.force_login(User.objects.get(username=username))
    return client


def api(username: str = "olga") -> APIClient:
    _, token = access_token_create(user=User.objects.get(username=username), name="t")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


# (page, query parameter, bad value, the id of the field the error is shown next to)
CONSOLE_FIELD_CASES = [
    *[
        ("/console/requests/", name, value, f"f-{name.replace('_', '-')}")
        for name in ("request_id", "tenant", "key", "model", "account", "status", "from", "to")
        for value in ("a%00b",)
    ],
    ("/console/requests/", "from", "2026-13-45", "f-from"),
    ("/console/requests/", "from", "2026-02-30", "f-from"),
    ("/console/requests/", "to", "0001-01-01T00:00:00-14:00", "f-to"),
    ("/console/requests/", "to", "99999-01-01", "f-to"),
    ("/console/requests/", "from", "yesterday", "f-from"),
    ("/console/requests/", "key", "abc", "f-key"),
    ("/console/requests/", "key", BIG, "f-key"),
    ("/console/requests/", "key", "%C2%B2", "f-key"),  # a superscript two: a digit to str.isdigit
    ("/console/requests/", "account", "-1", "f-account"),
    ("/console/requests/", "account", "0", "f-account"),
    ("/console/requests/", "status", "abc", "f-status"),
    ("/console/requests/", "status", BIG, "f-status"),
    ("/console/requests/", "model", "m" * 300, "f-model"),
    *[("/console/requests/", "before", cursor, "f-before") for cursor in FORGED_CURSORS],
    *[("/console/requests/", "after", cursor, "f-after") for cursor in FORGED_CURSORS],
    *[("/console/requests/", "sort", value, "f-sort") for value in BAD_SORTS],
    ("/console/requests/", "sort", "actor", "f-sort"),  # the audit log's, not this one's
    ("/console/audit/", "tenant", "a%00", "a-tenant"),
    ("/console/audit/", "action", "a%00", "a-action"),
    *[("/console/audit/", "before", cursor, "a-before") for cursor in FORGED_CURSORS],
    *[("/console/audit/", "after", cursor, "a-after") for cursor in FORGED_CURSORS],
    *[("/console/audit/", "sort", value, "a-sort") for value in BAD_SORTS],
    ("/console/audit/", "sort", "latency", "a-sort"),
    ("/console/usage/", "tenant", "a%00", "u-tenant"),
    ("/console/usage/", "group_by", "nope", "u-group-by"),
    ("/console/usage/", "group_by", "a%00", "u-group-by"),
    ("/console/usage/", "range", "a%00", "u-range"),
    ("/console/usage/", "format", "xml", "u-format"),
]


@pytest.mark.parametrize(("page", "name", "value", "field_id"), CONSOLE_FIELD_CASES)
def test_a_bad_filter_is_an_error_next_to_its_field(page: str, name: str, value: str, field_id: str) -> None:
    response = console().get(f"{page}?{name}={value}")
    assert response.status_code == 400
    html = response.content.decode()
    error = re.search(rf'id="{field_id}-errors" role="alert"><li>([^<]+)</li>', html)
    assert error is not None, html
    assert "req_1" not in html  # no rows under a refused filter


# (query, the id of the field the error is next to): cursors that do not fit their order, and
# values of every kind of column a cursor may carry that the database could not compare.
SORTED_CURSOR_CASES = [
    ("sort=-latency&after=-latency,nan,1", "f-after"),
    ("sort=-latency&after=-latency,inf,1", "f-after"),
    ("sort=-latency&after=-latency,1e999,1", "f-after"),
    ("sort=-latency&after=-latency,abc,1", "f-after"),
    ("sort=-latency&after=-latency,,1", "f-after"),  # latency is never unknown
    ("sort=-latency&after=-latency,1.5," + BIG, "f-after"),
    ("sort=-latency&after=-time,2026-01-01T00:00:00%2B00:00,1", "f-after"),  # made for time
    ("sort=cost&before=cost,1e-999999,1", "f-before"),  # PostgreSQL's numeric cannot hold it
    ("sort=cost&before=cost,1E5,1", "f-before"),
    ("sort=cost&before=cost," + "9" * 30 + ",1", "f-before"),
    ("sort=cost&before=cost,0x10,1", "f-before"),
    ("sort=-tokens&after=-tokens,1.5,1", "f-after"),
    ("sort=-tokens&after=-tokens," + BIG + ",1", "f-after"),
    ("sort=status&after=status,%C2%B2,1", "f-after"),
    ("sort=-time&after=-time,,12", "f-after"),  # a time is never unknown
    ("sort=-time&after=-time,9999-12-31T23:59:59-14:00,1", "f-after"),
    ("after=-time,2026-01-01T00:00:00%2B00:00,1&before=-time,2026-01-01T00:00:00%2B00:00,2", "f-before"),
]
SORTED_AUDIT_CASES = [
    ("sort=actor&after=actor," + "a" * 250 + ",1", "a-after"),
    ("sort=actor&after=actor,ann%00,1", "a-after"),
    ("sort=-time&after=-time,12,1", "a-after"),  # time is by id alone: no value
    ("sort=action&after=-action,x,1", "a-after"),
]


@pytest.mark.parametrize(("query", "field_id"), SORTED_CURSOR_CASES)
def test_a_cursor_that_does_not_fit_its_order_is_an_error_next_to_it(query: str, field_id: str) -> None:
    response = console().get(f"/console/requests/?{query}")
    assert response.status_code == 400
    html = response.content.decode()
    assert re.search(rf'id="{field_id}-errors" role="alert"><li>[^<]+</li>', html), html
    assert "req_1" not in html


@pytest.mark.parametrize(("query", "field_id"), SORTED_AUDIT_CASES)
def test_a_cursor_of_the_audit_log_that_does_not_fit_is_an_error_next_to_it(query: str, field_id: str) -> None:
    response = console().get(f"/console/audit/?{query}")
    assert response.status_code == 400
    assert re.search(rf'id="{field_id}-errors" role="alert"><li>[^<]+</li>', response.content.decode())


@pytest.mark.parametrize(
    "url",
    [
        "/console/requests/?sort=-cost&after=-cost,,1",  # past the last unknown cost: an empty page
        "/console/requests/?sort=cost&before=cost,0.000000001,1",
        "/console/requests/?sort=-latency&after=-latency,1e-05,1",
        "/console/requests/?sort=-tokens&after=-tokens,-5,1",
        "/console/requests/?sort=status&before=status,599,9223372036854775807",
        "/console/audit/?sort=actor&after=actor,,1",  # an empty name is a name
        "/console/audit/?sort=-action&after=-action,a%2Cb,1",  # commas in a value
        "/console/audit/?sort=time&before=time,,5",
    ],
)
def test_a_well_formed_cursor_anywhere_in_its_order_shows_a_page(url: str) -> None:
    assert console().get(url).status_code == 200


def test_the_range_from_must_come_before_to() -> None:
    response = console().get("/console/requests/?from=2026-02-01&to=2026-01-01")
    assert response.status_code == 400
    assert 'id="f-to-errors"' in response.content.decode()


# Pages without a filter form: a NUL anywhere is a 400 page naming the parameter.
CONSOLE_NUL_PAGES = [
    "/console/?tenant=a%00",
    "/console/?range=1h%00",
    "/console/tenants/?q=a%00",
    "/console/tenants/?sort=a%00",
    "/console/tenants/acme/keys/?state=a%00",
    "/console/tenants/acme/?page=%00",
    "/console/pools/?sort=%00",
    "/console/models/?x%00=1",
    "/console/live/?tenant=%00",
    "/console/security/?next=%00",
]


@pytest.mark.parametrize("url", CONSOLE_NUL_PAGES)
def test_a_nul_character_on_any_console_page_is_a_400_naming_it(url: str) -> None:
    response = console().get(url)
    assert response.status_code == 400
    assert "must not contain the NUL character" in response.content.decode()


# Harmless input: the page as usual (default order, nearest page, no such tenant: 404).
CONSOLE_HARMLESS = [
    ("/console/tenants/?sort=nope", 200),
    ("/console/tenants/?sort=-nope", 200),
    ("/console/tenants/?page=" + BIG, 200),
    ("/console/tenants/?page=-3", 200),
    ("/console/tenants/?page=abc", 200),
    ("/console/tenants/acme/keys/?sort=nope&page=" + BIG, 200),
    ("/console/?range=nope", 200),
    ("/console/?tenant=" + BIG, 404),
    ("/console/?tenant=%C2%B2", 404),
    ("/console/requests/?tenant=" + BIG, 404),
    ("/console/requests/?tenant=nobody", 404),
    ("/console/requests/a%00b/", 404),
    ("/console/requests/" + "x" * 500 + "/", 404),
    ("/console/usage/?range=nope", 200),
]


@pytest.mark.parametrize(("url", "status"), CONSOLE_HARMLESS)
def test_harmless_odd_input_shows_the_page_or_a_404(url: str, status: int) -> None:
    assert console().get(url).status_code == status


# (endpoint, query parameter, bad value)
API_CASES = [
    *[
        ("/api/v1/usage/records/", name, "a%00b")
        for name in ("tenant", "key", "account", "model", "status", "request_id", "from", "to", "cursor", "limit")
    ],
    *[("/api/v1/audit/", name, "a%00b") for name in ("tenant", "action", "target_type", "actor", "from", "to")],
    ("/api/v1/usage/records/", "from", "2026-13-45T00:00:00Z"),
    ("/api/v1/usage/records/", "from", "2026-01-01"),
    ("/api/v1/usage/records/", "to", "0001-01-01T00:00:00-14:00"),
    ("/api/v1/usage/records/", "to", "9999-12-31T23:59:59-14:00"),
    ("/api/v1/usage/records/", "key", "abc"),
    ("/api/v1/usage/records/", "key", BIG),
    ("/api/v1/usage/records/", "account", "%C2%B2"),
    ("/api/v1/usage/records/", "status", "abc"),
    ("/api/v1/audit/", "actor", BIG),
    ("/api/v1/audit/", "from", "yesterday"),
    ("/api/v1/usage/records/", "cursor", "garbage"),
    ("/api/v1/usage/records/", "cursor", "cD1hYmM="),  # base64 of "p=abc"
    ("/api/v1/usage/records/", "cursor", "cD05OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5"),  # p=99...9
    ("/api/v1/audit/", "cursor", "cD0lMDA="),  # p=%00
    ("/api/v1/reports/usage", "from", "a%00"),
    ("/api/v1/tenants/", "x%00", "1"),
]


@pytest.mark.parametrize(("endpoint", "name", "value"), API_CASES)
def test_a_bad_parameter_is_a_400_of_the_api(endpoint: str, name: str, value: str) -> None:
    response = api().get(f"{endpoint}?{name}={value}")
    assert response.status_code == 400, response.content
    body = response.json()
    assert body, body
    assert name.replace("%00", "?") in body or "detail" in body or "error" in body, body


@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("/api/v1/usage/records/" + BIG + "/", 404),
        ("/api/v1/usage/records/abc/", 404),
        ("/api/v1/audit/" + BIG + "/", 404),
        ("/api/v1/usage/records/?tenant=" + BIG, 404),
        ("/api/v1/usage/records/?limit=" + BIG, 200),
        ("/api/v1/usage/records/?ordering=nope", 200),
    ],
)
def test_harmless_odd_input_of_the_api(url: str, status: int) -> None:
    assert api("owen").get(url).status_code == status


def test_a_cursor_the_api_made_still_works() -> None:
    tenant = Tenant.objects.get(slug="acme")
    for n in range(3):
        UsageRecord.objects.create(
            request_id=f"req_x{n}",
            tenant=tenant,
            model="m",
            status_code=200,
            outcome="completed",
            latency_ms=1.0,
            created_at=timezone.now(),
        )
    first = api().get("/api/v1/usage/records/?limit=2").json()
    assert first["next"]
    second = api().get(first["next"])
    assert second.status_code == 200
    assert len(second.json()["results"]) == 2
