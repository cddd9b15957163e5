"""The console's pages (issue 13) through the Django test client: each page calls the same
services as the management API, with its role rules. Operators see and change everything;
owners and admins manage their tenant; viewers read and see no button that changes anything;
anything outside the caller's tenants (or the supply side, for a non-operator) is 404."""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.contrib.staticfiles import finders
from django.core.cache import cache
from django.test import Client
from django.utils import timezone

from accounts.models import AccountTransition, ModelRoute, Pool, UpstreamAccount
from accounts.services import model_route_set, pool_get_or_create, upstream_account_create
from tenancy.billing import HIST_RELATIVE_ERROR
from tenancy.keys import key_digest
from tenancy.models import ApiKey, AuditEntry, Membership, PriceVersion, Role, Tenant, UsageRecord
from tenancy.overview import rolled_up_until, usage_overview
from tenancy.services.keys import apikey_create
from tenancy.services.members import member_add
from tenancy.services.prices import price_set
from tenancy.services.rollups import rollup_recent
from tenancy.services.tenants import tenant_create
from tests.console import signed_in_client

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"
CREDENTIAL = "sk-upstream-console-secret-41f"


@pytest.fixture(autouse=True)
def _clear() -> None:
    cache.clear()


def signed_in(username: str) -> Client:
    return signed_in_client(username, PASSWORD)


@pytest.fixture
def operator() -> Client:
    User.objects.create_user("olga", password=PASSWORD, is_staff=True)
    return signed_in("olga")


@dataclasses.dataclass
class World:
    mine: Tenant
    theirs: Tenant
    key: ApiKey
    other_key: ApiKey
    account: UpstreamAccount
    route: ModelRoute


@pytest.fixture
def world() -> World:
    """Two tenants with a key each, members of each role in ``mine``, an admin of ``theirs``,
    a pool with an account, a route and a price."""
    mine = tenant_create(slug="mine", name="Mine")
    theirs = tenant_create(slug="theirs", name="Theirs")
    member_add(tenant=mine, username="owen", role=Role.OWNER, password=PASSWORD)
    member_add(tenant=mine, username="adam", role=Role.ADMIN, password=PASSWORD)
    member_add(tenant=mine, username="vera", role=Role.VIEWER, password=PASSWORD)
    member_add(tenant=theirs, username="tess", role=Role.ADMIN, password=PASSWORD)
    key, _ = apikey_create(tenant=mine, name="mine key")
    other_key, _ = apikey_create(tenant=theirs, name="their key")
    pool = pool_get_or_create(name="main")
    account = upstream_account_create(pool=pool, base_url="http://127.0.0.1:9/v1", api_key=CREDENTIAL, models=["m1"])
    route = model_route_set(model="alias", targets=[("main", "m1")])
    price_set(model="m1", input="1", cached_input="0.5", cache_write="1", output="2")
    return World(mine=mine, theirs=theirs, key=key, other_key=other_key, account=account, route=route)


def secret_on(html: str) -> str:
    """The secret a key page shows once."""
    found = re.search(r'<output id="secret-value"[^>]*>([^<]+)</output>', html)
    assert found is not None
    return found.group(1)


def write_marks(html: str) -> int:
    return html.count('data-write="1"')


# --- assets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/static/console/vendor/htmx/htmx.min.js",
        "/static/console/vendor/uplot/uPlot.iife.min.js",
        "/static/console/vendor/uplot/uPlot.min.css",
        "/static/console/console.css",
        "/static/console/console.js",
        "/static/console/charts.js",
    ],
)
def test_the_vendored_and_own_assets_are_served_by_the_gateway(path: str) -> None:
    response = Client().get(path)
    assert response.status_code == 200
    body = b"".join(response.streaming_content) if response.streaming else response.content  # type: ignore[attr-defined]
    found = finders.find(path.removeprefix("/static/"))
    assert isinstance(found, str)
    assert body == Path(found).read_bytes()


def test_no_page_has_an_inline_script_or_style(operator: Client, world: World) -> None:
    account = world.account
    for path in [
        "/console/",
        "/console/tenants/",
        "/console/tenants/mine/",
        "/console/pools/",
        f"/console/accounts/{account.pk}/",
        "/console/models/",
        "/console/security/",
    ]:
        html = operator.get(path).content.decode()
        for tag in re.findall(r"<script[^>]*>", html):
            assert ' src="/static/' in tag or 'type="application/json"' in tag, (path, tag)
        assert " style=" not in html, path
        assert "<style" not in html, path


# --- the outsider gets 404 everywhere (table-driven) ---------------------------------------


def _their_request(world: World) -> str:
    """A request of their tenant in the request log (made on first use)."""
    record, _ = UsageRecord.objects.get_or_create(
        request_id="req_theirs_1",
        defaults={
            "tenant": world.theirs,
            "api_key": world.other_key,
            "model": "m1",
            "status_code": 200,
            "outcome": "completed",
            "latency_ms": 5.0,
            "created_at": timezone.now(),
        },
    )
    return record.request_id


def _tenant_pages(world: World) -> list[str]:
    other = world.other_key
    member = Membership.objects.get(user__username="tess")
    return [
        "/console/tenants/theirs/",
        "/console/tenants/theirs/edit/",
        "/console/tenants/theirs/suspend/",
        "/console/tenants/theirs/resume/",
        "/console/tenants/theirs/members/add/",
        f"/console/tenants/theirs/members/{member.pk}/role/",
        f"/console/tenants/theirs/members/{member.pk}/remove/",
        "/console/tenants/theirs/keys/",
        "/console/tenants/theirs/keys/new/",
        f"/console/tenants/theirs/keys/{other.pk}/",
        f"/console/tenants/theirs/keys/{other.pk}/rotate/",
        f"/console/tenants/theirs/keys/{other.pk}/revoke/",
        # a key of their tenant under a tenant of mine is not found either
        f"/console/tenants/mine/keys/{other.pk}/",
        f"/console/tenants/mine/keys/{other.pk}/revoke/",
        "/console/?tenant=theirs",
        f"/console/requests/{_their_request(world)}/",
        "/console/requests/?tenant=theirs",
        # ... in every order, on any page of it
        *[
            f"/console/requests/?tenant=theirs&sort={sort}"
            for sort in ("time", "-latency", "cost", "-tokens", "status")
        ],
        "/console/requests/?tenant=theirs&sort=-latency&after=-latency,12.5,1",
        "/console/requests/?tenant=theirs&sort=cost&before=cost,,7",
        "/console/requests/?tenant=theirs&sort=-latency&model=m1",  # an order no index serves
        "/console/audit/?tenant=theirs",
        *[f"/console/audit/?tenant=theirs&sort={sort}" for sort in ("time", "-actor", "action")],
        "/console/audit/?tenant=theirs&sort=actor&after=actor,tess,3",
        "/console/usage/?tenant=theirs",
    ]


def _operator_pages(world: World) -> list[str]:
    account = world.account
    route = world.route
    return [
        "/console/pools/",
        "/console/pools/main/",
        "/console/pools/main/delete/",
        "/console/accounts/new/",
        f"/console/accounts/{account.pk}/",
        f"/console/accounts/{account.pk}/enable/",
        f"/console/accounts/{account.pk}/disable/",
        f"/console/accounts/{account.pk}/test/",
        "/console/models/",
        f"/console/models/routes/{route.pk}/delete/",
    ]


@pytest.mark.parametrize("username", ["owen", "adam", "vera"])
@pytest.mark.parametrize("method", ["get", "post"])
def test_every_page_outside_the_callers_tenants_is_404(world: World, username: str, method: str) -> None:
    client = signed_in(username)
    for path in [*_tenant_pages(world), *_operator_pages(world)]:
        response = getattr(client, method)(path)
        assert response.status_code == 404, (username, method, path, response.status_code)
    # ... and nothing changed
    assert Tenant.objects.get(slug="theirs").is_active
    assert ApiKey.objects.get(pk=world.other_key.pk).revoked_at is None
    assert UpstreamAccount.objects.get(pk=world.account.pk).enabled
    assert ModelRoute.objects.filter(model="alias").exists()
    assert Pool.objects.filter(name="main").exists()


def test_an_anonymous_visit_to_any_page_goes_to_the_login_page(world: World) -> None:
    client = Client()
    for path in [*_tenant_pages(world), *_operator_pages(world), "/console/tenants/", "/console/security/"]:
        response = client.get(path)
        assert response.status_code == 302, path
        assert response["Location"].startswith("/console/login/?next="), path


# --- viewers read only ------------------------------------------------------------------------


def test_a_viewer_sees_no_change_button_and_every_write_is_refused(world: World) -> None:
    viewer = signed_in("vera")
    key = world.key
    pages = [
        "/console/tenants/",
        "/console/tenants/mine/",
        "/console/tenants/mine/keys/",
        f"/console/tenants/mine/keys/{key.pk}/",
        "/console/requests/?sort=-latency",
        "/console/requests/?sort=cost&tenant=mine",
        "/console/audit/?sort=actor",
    ]
    for path in pages:
        page = viewer.get(path)
        assert page.status_code == 200, path
        assert write_marks(page.content.decode()) == 0, path
        forms = re.findall(r'<form method="post"[^>]*>', page.content.decode())
        assert forms == ['<form method="post" action="/console/logout/">'], path
    member = Membership.objects.get(user__username="adam")
    writes = {
        "/console/tenants/new/": {"slug": "x"},
        "/console/tenants/mine/edit/": {"name": "Renamed"},
        "/console/tenants/mine/suspend/": {},
        "/console/tenants/mine/members/add/": {"username": "mallory", "role": "owner"},
        f"/console/tenants/mine/members/{member.pk}/role/": {"role": "viewer"},
        f"/console/tenants/mine/members/{member.pk}/remove/": {},
        "/console/tenants/mine/keys/new/": {"name": "sneaky"},
        f"/console/tenants/mine/keys/{key.pk}/": {"name": "renamed"},
        f"/console/tenants/mine/keys/{key.pk}/rotate/": {"grace_seconds": "0"},
        f"/console/tenants/mine/keys/{key.pk}/revoke/": {},
    }
    for path, body in writes.items():
        assert viewer.post(path, body).status_code == 403, path
    key.refresh_from_db()
    assert key.revoked_at is None
    assert key.name == "mine key"
    assert Tenant.objects.get(slug="mine").is_active
    assert not User.objects.filter(username="mallory").exists()
    assert Membership.objects.get(pk=member.pk).role == Role.ADMIN


def test_a_tenant_admin_manages_keys_and_members_but_not_limits_or_the_owner_role(world: World) -> None:
    admin = signed_in("adam")
    page = admin.get("/console/tenants/mine/").content.decode()
    assert write_marks(page) > 0
    assert "Edit limits and budget" not in page
    assert "Suspend" not in page
    assert admin.get("/console/tenants/mine/edit/").status_code == 403
    assert admin.post("/console/tenants/mine/suspend/").status_code == 403
    assert admin.get("/console/tenants/new/").status_code == 403
    assert admin.post("/console/tenants/mine/members/add/", {"username": "nina", "role": "owner"}).status_code == 403
    added = admin.post("/console/tenants/mine/members/add/", {"username": "nina", "role": "viewer"})
    assert added.status_code == 302
    assert Membership.objects.get(user__username="nina").role == Role.VIEWER
    owner = Membership.objects.get(user__username="owen")
    assert admin.post(f"/console/tenants/mine/members/{owner.pk}/remove/").status_code == 403
    # the nav shows no supply-side page to a non-operator
    assert "/console/pools/" not in page


# --- an operator's walk -----------------------------------------------------------------------


def test_an_operator_creates_a_tenant_with_errors_next_to_the_fields(operator: Client) -> None:
    bad = operator.post("/console/tenants/new/", {"slug": "not a slug", "rpm": "0", "budget_period": "month"})
    assert bad.status_code == 200
    html = bad.content.decode()
    assert re.search(r'id="id_slug_errors"', html)
    assert re.search(r'id="id_rpm_errors"', html)
    assert not Tenant.objects.exists()
    made = operator.post(
        "/console/tenants/new/",
        {
            "slug": "acme",
            "name": "Acme",
            "rpm": "60",
            "budget_usd": "12.50",
            "budget_period": "month",
            "budget_soft_percent": "80",
        },
    )
    assert made.status_code == 302
    assert made["Location"] == "/console/tenants/acme/"
    tenant = Tenant.objects.get(slug="acme")
    assert (tenant.rpm, tenant.budget_usd) == (60, Decimal("12.50"))
    duplicate = operator.post("/console/tenants/new/", {"slug": "acme", "budget_period": "month"})
    assert "already exists" in duplicate.content.decode()
    entry = AuditEntry.objects.get(action="tenant.create")
    assert (entry.source, entry.actor_label) == ("console", "olga")


def test_an_operator_edits_limits_suspends_and_resumes_a_tenant(operator: Client) -> None:
    tenant_create(slug="acme", name="Acme")
    fixed = operator.post("/console/tenants/acme/edit/", {"name": "Acme", "budget_period": "fixed"})
    assert fixed.status_code == 200
    assert re.search(r'id="id_budget_window_start_errors"><li>a fixed budget period needs', fixed.content.decode())
    saved = operator.post("/console/tenants/acme/edit/", {"name": "Acme Corp", "tpm": "1000", "budget_period": "day"})
    assert saved.status_code == 302
    tenant = Tenant.objects.get(slug="acme")
    assert (tenant.name, tenant.tpm, tenant.budget_period) == ("Acme Corp", 1000, "day")
    confirm = operator.get("/console/tenants/acme/suspend/")
    assert confirm.status_code == 200
    assert "Suspend tenant" in confirm.content.decode()
    assert Tenant.objects.get(slug="acme").is_active  # a GET only asks
    assert operator.post("/console/tenants/acme/suspend/").status_code == 302
    assert not Tenant.objects.get(slug="acme").is_active
    assert operator.get("/console/tenants/acme/resume/").status_code == 405
    assert operator.post("/console/tenants/acme/resume/").status_code == 302
    assert Tenant.objects.get(slug="acme").is_active


def test_the_tenant_list_sorts_paginates_and_searches(operator: Client) -> None:
    for i in range(30):
        tenant_create(slug=f"t{i:02d}", name=f"Tenant {i:02d}")
    first = operator.get("/console/tenants/?sort=-slug").content.decode()
    assert first.index("t29") < first.index("t28")
    assert "t00" not in first  # on page 2
    assert 'aria-sort="descending"' in first
    second = operator.get("/console/tenants/?sort=-slug&page=2").content.decode()
    assert "t00" in second
    assert "t07" in operator.get("/console/tenants/?q=t07").content.decode()
    assert "No tenant matches" in operator.get("/console/tenants/?q=zzz").content.decode()


def test_a_key_is_created_with_its_secret_shown_once_then_edited_rotated_and_revoked(operator: Client) -> None:
    tenant_create(slug="acme", name="Acme")
    bad = operator.post(
        "/console/tenants/acme/keys/new/", {"name": "k", "allowed_ips": "not-an-ip", "budget_period": "month"}
    )
    assert bad.status_code == 200
    assert "not an IP address" in bad.content.decode()
    created = operator.post(
        "/console/tenants/acme/keys/new/",
        {
            "name": "ci",
            "allowed_models": "m1, m2",
            "rpm": "10",
            "max_output_tokens": "500",
            "budget_period": "month",
            "reasoning_efforts": "low, medium",
        },
    )
    assert created.status_code == 200
    html = created.content.decode()
    secret = secret_on(html)
    assert 'data-copy="secret-value"' in html
    key = ApiKey.objects.get(name="ci")
    assert key.digest == key_digest(secret)
    assert (key.allowed_models, key.rpm, key.max_output_tokens, key.reasoning_efforts) == (
        ["m1", "m2"],
        10,
        500,
        ["low", "medium"],
    )
    detail = operator.get(f"/console/tenants/acme/keys/{key.pk}/").content.decode()
    assert secret not in detail
    assert key.prefix in detail
    assert secret not in operator.get("/console/tenants/acme/keys/").content.decode()
    edited = operator.post(
        f"/console/tenants/acme/keys/{key.pk}/", {"name": "ci-2", "allowed_models": "", "budget_period": "week"}
    )
    assert edited.status_code == 302
    key.refresh_from_db()
    assert (key.name, key.allowed_models, key.rpm, key.budget_period) == ("ci-2", [], None, "week")
    assert "Grace period" in operator.get(f"/console/tenants/acme/keys/{key.pk}/rotate/").content.decode()
    rotated = operator.post(f"/console/tenants/acme/keys/{key.pk}/rotate/", {"grace_seconds": "3600"})
    new_secret = secret_on(rotated.content.decode())
    key.refresh_from_db()
    assert key.digest == key_digest(new_secret)
    assert key.previous_valid_until is not None
    assert "keeps working until" in rotated.content.decode()
    assert operator.get(f"/console/tenants/acme/keys/{key.pk}/revoke/").status_code == 200
    assert ApiKey.objects.get(pk=key.pk).revoked_at is None
    assert operator.post(f"/console/tenants/acme/keys/{key.pk}/revoke/").status_code == 302
    assert ApiKey.objects.get(pk=key.pk).revoked_at is not None
    assert "revoked" in operator.get("/console/tenants/acme/keys/?state=revoked").content.decode()
    assert "No active key" in operator.get("/console/tenants/acme/keys/").content.decode()
    actions = set(AuditEntry.objects.filter(source="console").values_list("action", flat=True))
    assert {"apikey.create", "apikey.update", "apikey.rotate", "apikey.revoke"} <= actions
    assert all(secret not in str(e.after) for e in AuditEntry.objects.all())


def test_an_operator_manages_pools_and_accounts_with_a_write_only_credential(operator: Client) -> None:
    assert "No pool yet" in operator.get("/console/pools/").content.decode()
    assert operator.post("/console/pools/", {"name": "main", "strategy": "fill_first"}).status_code == 302
    assert Pool.objects.get(name="main").strategy == "fill_first"
    bad = operator.post(
        "/console/accounts/new/",
        {"pool": "main", "base_url": "ftp://x", "models": "m1", "weight": "1", "priority": "0"},
    )
    assert bad.status_code == 400
    assert "base URL must be http" in bad.content.decode()
    made = operator.post(
        "/console/accounts/new/",
        {
            "pool": "main",
            "name": "primary",
            "base_url": "http://127.0.0.1:9/v1",
            "api_key": CREDENTIAL,
            "models": "m1, m2",
            "weight": "3",
            "priority": "1",
            "max_concurrency": "4",
            "enabled": "on",
        },
    )
    assert made.status_code == 302
    account = UpstreamAccount.objects.get(name="primary")
    assert (account.models, account.weight, account.priority, account.max_concurrency) == (["m1", "m2"], 3, 1, 4)
    assert account.credential_encrypted
    assert CREDENTIAL not in account.credential_encrypted
    for path in ["/console/pools/", "/console/pools/main/", f"/console/accounts/{account.pk}/", "/console/"]:
        html = operator.get(path).content.decode()
        assert CREDENTIAL not in html, path
        assert "primary" in html or path == "/console/", path
    # disabling asks first, with a reason; the history shows the transition
    assert operator.get(f"/console/accounts/{account.pk}/disable/").status_code == 200
    assert operator.post(f"/console/accounts/{account.pk}/disable/", {"reason": "quota"}).status_code == 302
    account.refresh_from_db()
    assert not account.enabled
    assert account.disabled_reason == "quota"
    page = operator.get(f"/console/accounts/{account.pk}/").content.decode()
    assert "disabled by operator: quota" in page
    assert operator.post(f"/console/accounts/{account.pk}/enable/").status_code == 302
    assert UpstreamAccount.objects.get(pk=account.pk).enabled
    assert AccountTransition.objects.filter(account=account).count() == 2
    # edit: a blank credential keeps the stored one
    stored = account.credential_encrypted
    edit = {
        "name": "primary",
        "base_url": "http://127.0.0.1:9/v1",
        "models": "m1",
        "weight": "5",
        "priority": "0",
        "enabled": "on",
    }
    assert operator.post(f"/console/accounts/{account.pk}/", edit).status_code == 302
    account.refresh_from_db()
    assert (account.weight, account.models, account.credential_encrypted) == (5, ["m1"], stored)
    assert operator.post("/console/pools/main/", {"strategy": "least_in_flight"}).status_code == 302
    assert Pool.objects.get(name="main").strategy == "least_in_flight"
    refused = operator.post("/console/pools/main/delete/", follow=True)
    assert "in use by 1 account" in refused.content.decode()


def test_the_test_button_runs_the_api_probe_and_shows_its_answer(operator: Client, world: World) -> None:
    account = world.account
    full = operator.post(f"/console/accounts/{account.pk}/test/")
    assert full.status_code == 200
    html = full.content.decode()
    assert "Test answer" in html
    assert "no_answer" in html
    assert "<h1>" in html
    partial = operator.post(f"/console/accounts/{account.pk}/test/", headers={"HX-Request": "true"})
    assert "no_answer" in partial.content.decode()
    assert "<html" not in partial.content.decode()
    assert CREDENTIAL not in html
    assert AuditEntry.objects.filter(action="account.test", source="console").count() == 2
    assert operator.get(f"/console/accounts/{account.pk}/test/").status_code == 405


def test_the_models_page_sets_routes_and_price_versions(operator: Client, world: World) -> None:
    page = operator.get("/console/models/").content.decode()
    assert "alias" in page
    assert "current" in page
    bad = operator.post("/console/models/", {"route-model": "fast", "route-targets": "nopool:m1"})
    assert bad.status_code == 400
    assert "unknown pool" in bad.content.decode()
    ok = operator.post("/console/models/", {"route-model": "fast", "route-targets": "main:m1\nmain:m2"})
    assert ok.status_code == 302
    assert [t.upstream_model for t in ModelRoute.objects.get(model="fast").targets.all()] == ["m1", "m2"]
    price = {
        "price-model": "m1",
        "price-input": "3",
        "price-cached_input": "1",
        "price-cache_write": "3",
        "price-output": "6",
    }
    assert operator.post("/console/models/", price).status_code == 302
    assert PriceVersion.objects.filter(model="m1").count() == 2
    page = operator.get("/console/models/").content.decode()
    assert page.count('badge active">current') == 1
    assert "earlier" in page
    route = ModelRoute.objects.get(model="fast")
    assert operator.post(f"/console/models/routes/{route.pk}/delete/").status_code == 302
    assert not ModelRoute.objects.filter(model="fast").exists()


# --- the overview ----------------------------------------------------------------------------


def _usage(tenant: Tenant, key: ApiKey, n: int, *, status: int = 200, minutes_ago: int = 5, model: str = "m1") -> None:
    now = timezone.now()
    UsageRecord.objects.bulk_create(
        UsageRecord(
            request_id=f"req_{tenant.slug}_{model}_{status}_{minutes_ago}_{i}",
            tenant=tenant,
            api_key=key,
            model=model,
            status_code=status,
            outcome="completed" if status < 400 else "upstream_error",
            total_tokens=10,
            cost=Decimal("0.001"),
            latency_ms=float(i + 1),
            ttfb_ms=float(i + 1) / 2,
            created_at=now - timedelta(minutes=minutes_ago),
        )
        for i in range(n)
    )


def test_the_overview_selector_aggregates_a_time_range_of_the_given_tenants(world: World) -> None:
    mine, theirs = world.mine, world.theirs
    _usage(mine, world.key, 18)
    _usage(mine, world.key, 2, status=502, model="m2")
    _usage(mine, world.key, 7, minutes_ago=60 * 30)  # outside 24 h
    _usage(theirs, world.other_key, 5)
    end = timezone.now()
    seen = usage_overview(tenant_ids=[mine.pk], start=end - timedelta(hours=24), end=end, bucket="hour")
    assert (seen["requests"], seen["errors"], seen["tokens"]) == (20, 2, 200)
    assert seen["error_rate"] == pytest.approx(0.1)
    assert seen["cost"] == Decimal("0.020")
    # 1..18 and 1..2 sorted: the 10th and 19th values (nearest rank), from a histogram
    assert seen["latency_p50"] == pytest.approx(8.0, rel=HIST_RELATIVE_ERROR * 1.01)
    assert seen["latency_p95"] == pytest.approx(17.0, rel=HIST_RELATIVE_ERROR * 1.01)
    assert len(seen["series"]) in (24, 25)
    assert sum(row["requests"] for row in seen["series"]) == 20
    assert [m["model"] for m in seen["top_models"]] == ["m1", "m2"]
    assert seen["top_keys"][0]["requests"] == 20
    everyone = usage_overview(tenant_ids=None, start=end - timedelta(hours=24), end=end, bucket="hour")
    assert everyone["requests"] == 25
    empty = usage_overview(tenant_ids=[mine.pk], start=end - timedelta(minutes=1), end=end, bucket="minute")
    assert empty["requests"] == 0
    assert empty["latency_p50"] is None
    assert empty["error_rate"] is None
    assert seen["rolled_up"] is None  # no rollup has run: every figure from the records


def test_the_overview_reads_the_rollups_for_whole_buckets_and_the_records_after_them(world: World) -> None:
    mine = world.mine
    _usage(mine, world.key, 18, minutes_ago=180)
    _usage(mine, world.key, 2, status=502, minutes_ago=120, model="m2")
    _usage(world.theirs, world.other_key, 5, minutes_ago=180)
    end = timezone.now()
    rollup_recent()
    rolled_until = rolled_up_until()
    assert rolled_until is not None
    _usage(mine, world.key, 3, minutes_ago=0)  # after the rollup: read from the records
    # What the rollups hold is what the overview shows for their part: change the records
    # under them and the figures do not move (they are not read).
    UsageRecord.objects.filter(created_at__lt=rolled_until - timedelta(minutes=60)).update(total_tokens=999)
    seen = usage_overview(tenant_ids=[mine.pk], start=end - timedelta(hours=24), end=end + timedelta(seconds=1))
    assert seen["rolled_up"] is not None
    assert (seen["requests"], seen["errors"]) == (23, 2)
    # The rolled-up records carry no input/output split (so no billed tokens) and their
    # total_tokens changed to 999: neither is read; the 3 raw records' total_tokens are.
    assert seen["tokens"] == 30
    assert seen["cost"] == Decimal("0.003")  # the rolled-up records have no price: the 3 raw ones
    assert sum(row["requests"] for row in seen["series"]) == 23
    assert [m["model"] for m in seen["top_models"]] == ["m1", "m2"]
    assert seen["top_keys"][0]["requests"] == 23
    assert seen["latency_p50"] == pytest.approx(8.0, rel=0.15)
    assert usage_overview(tenant_ids=None, start=end - timedelta(hours=24), end=end)["requests"] == 25


def test_the_overview_page_shows_the_callers_figures_and_a_chart(world: World, operator: Client) -> None:
    _usage(world.mine, world.key, 4)
    _usage(world.theirs, world.other_key, 3)
    owner = signed_in("owen").get("/console/?range=1h").content.decode()
    assert "<dd>4</dd>" in owner
    assert 'id="overview-series"' in owner
    assert "uPlot.iife.min.js" in owner
    assert "their key" not in owner
    assert "Upstream health" not in owner
    assert "<dd>7</dd>" in operator.get("/console/").content.decode()
    assert "<dd>3</dd>" in operator.get("/console/?tenant=theirs").content.decode()
    assert "Upstream health" in operator.get("/console/").content.decode()
    quiet = signed_in("tess").get("/console/?range=30d&tenant=theirs").content.decode()
    assert "<dd>3</dd>" in quiet
    tenant_create(slug="quiet", name="Quiet")
    empty = operator.get("/console/?tenant=quiet").content.decode()
    assert "No request in this range for Quiet" in empty
    assert 'id="overview-series"' not in empty
