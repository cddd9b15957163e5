"""The demand side's endpoints: tenants, keys, members, the audit log and the request log."""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.request import Request
from rest_framework.test import APIClient, APIRequestFactory

from tenancy.api.base import TimeKeysetPagination
from tenancy.keys import key_digest
from tenancy.models import ApiKey, AuditEntry, Membership, Tenant, UsageRecord
from tenancy.services.members import member_add
from tenancy.services.tokens import access_token_create

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _clear_throttles() -> None:
    cache.clear()


def client_for(user: User) -> APIClient:
    _, token = access_token_create(user=user, name="test")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


@pytest.fixture
def acme() -> Tenant:
    return Tenant.objects.create(slug="acme", name="Acme", rpm=1000, budget_usd=50)


@pytest.fixture
def operator() -> APIClient:
    return client_for(User.objects.create_user("ops", is_staff=True))


def member(tenant: Tenant, name: str, role: str) -> APIClient:
    return client_for(member_add(tenant=tenant, username=name, role=role).user)


def test_a_key_is_created_with_its_secret_once_and_audited_by_prefix_only(acme: Tenant) -> None:
    admin = member(acme, "ann", "admin")
    created = admin.post("/api/v1/keys/", {"tenant": "acme", "name": "ci", "rpm": 100}, format="json")
    assert created.status_code == 201
    body = created.json()
    secret = body["key"]
    row = ApiKey.objects.get(pk=body["id"])
    assert row.digest == key_digest(secret)
    assert secret.startswith(body["prefix"])
    again = admin.get(f"/api/v1/keys/{body['id']}/")
    assert "key" not in again.json()
    assert secret not in again.content.decode()
    entry = AuditEntry.objects.get(action="apikey.create")
    assert entry.target_label == row.prefix
    assert entry.tenant_id == acme.pk
    assert entry.actor_label == "ann"
    text = str(entry.before) + str(entry.after)
    assert secret not in text
    assert row.digest not in text


def test_audit_shows_before_and_after_of_a_key_update_a_limit_change_and_a_member_removal(acme: Tenant) -> None:
    owner = member(acme, "olga", "owner")
    member_add(tenant=acme, username="vic", role="viewer")
    key_id = owner.post("/api/v1/keys/", {"tenant": "acme", "name": "laptop"}, format="json").json()["id"]

    assert owner.patch(f"/api/v1/keys/{key_id}/", {"name": "desktop"}, format="json").status_code == 200
    assert owner.patch(f"/api/v1/keys/{key_id}/", {"rpm": 60, "tpm": None}, format="json").status_code == 200
    vic = Membership.objects.get(user__username="vic")
    assert owner.delete(f"/api/v1/members/{vic.pk}/").status_code == 204

    log = owner.get("/api/v1/audit/").json()["results"]
    by_action = {entry["action"]: entry for entry in log}
    assert by_action["apikey.update"]["before"] == {"name": "laptop"}
    assert by_action["apikey.update"]["after"] == {"name": "desktop"}
    assert by_action["apikey.limits"]["before"] == {"rpm": None}
    assert by_action["apikey.limits"]["after"] == {"rpm": 60}
    removal = by_action["member.remove"]
    assert removal["before"]["role"] == "viewer"
    assert removal["after"] is None
    assert removal["target_label"] == "vic in acme"
    through_api = [entry for entry in log if entry["source"] == "api"]
    assert len(through_api) == 4  # create, update, limits, remove
    assert all(entry["request_id"] and entry["actor_label"] == "olga" for entry in through_api)


def test_a_key_limit_above_the_tenants_is_refused_naming_the_field(acme: Tenant) -> None:
    admin = member(acme, "ann", "admin")
    refused = admin.post("/api/v1/keys/", {"tenant": "acme", "rpm": 5000}, format="json")
    assert refused.status_code == 400
    assert "rpm" in refused.json()
    assert "tenant's own limit" in refused.json()["rpm"][0]
    key_id = admin.post("/api/v1/keys/", {"tenant": "acme", "budget_usd": "20"}, format="json").json()["id"]
    over = admin.patch(f"/api/v1/keys/{key_id}/", {"budget_usd": "50.01"}, format="json")
    assert over.status_code == 400
    assert list(over.json()) == ["budget_usd"]
    assert ApiKey.objects.get(pk=key_id).budget_usd == 20


def test_only_operators_set_a_tenants_limits_and_suspend_it(acme: Tenant, operator: APIClient) -> None:
    admin = member(acme, "ann", "admin")
    assert admin.patch(f"/api/v1/tenants/{acme.pk}/", {"rpm": 10**6}, format="json").status_code == 403
    suspended = operator.patch(f"/api/v1/tenants/{acme.pk}/", {"is_active": False, "rpm": 2000}, format="json")
    assert suspended.status_code == 200
    assert suspended.json()["is_active"] is False
    assert suspended.json()["rpm"] == 2000
    acme.refresh_from_db()
    assert (acme.is_active, acme.rpm) == (False, 2000)
    actions = set(AuditEntry.objects.filter(tenant_id=acme.pk).values_list("action", flat=True))
    assert {"tenant.update", "tenant.limits"} <= actions


def test_an_admin_cannot_hand_out_or_take_away_ownership(acme: Tenant) -> None:
    owner = member(acme, "olga", "owner")
    admin = member(acme, "ann", "admin")
    made = admin.post("/api/v1/members/", {"tenant": "acme", "username": "eve", "role": "owner"}, format="json")
    assert made.status_code == 403
    olga = Membership.objects.get(user__username="olga")
    assert admin.patch(f"/api/v1/members/{olga.pk}/", {"role": "viewer"}, format="json").status_code == 403
    assert admin.delete(f"/api/v1/members/{olga.pk}/").status_code == 403
    assert (
        owner.post(
            "/api/v1/members/", {"tenant": "acme", "username": "eve", "role": "owner"}, format="json"
        ).status_code
        == 201
    )
    # The last owner stays: refusing is a 400 with the reason.
    alone = Tenant.objects.create(slug="solo", name="Solo")
    solo_owner = member(alone, "sam", "owner")
    sam = Membership.objects.get(user__username="sam")
    refused = solo_owner.delete(f"/api/v1/members/{sam.pk}/")
    assert refused.status_code == 400
    assert "last owner" in refused.json()["detail"]


def record(tenant: Tenant, n: int, **fields: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "request_id": f"req_{tenant.slug}_{n}",
        "tenant": tenant,
        "model": "gpt-4.1",
        "status_code": 200,
        "outcome": "completed",
        "latency_ms": 10.0,
        "created_at": timezone.now() - timedelta(minutes=n),
        **fields,
    }
    return UsageRecord.objects.create(**values)


def test_the_request_log_filters_pages_and_stays_in_the_tenant(acme: Tenant) -> None:
    other = Tenant.objects.create(slug="umbra", name="Umbra")
    viewer = member(acme, "vic", "viewer")
    for n in range(7):
        record(acme, n, status_code=429 if n % 3 == 0 else 200, model="gpt-4.1-mini" if n == 5 else "gpt-4.1")
    record(other, 0)
    page = viewer.get("/api/v1/usage/records/?limit=3").json()  # newest first by time, not id
    assert [r["request_id"] for r in page["results"]] == ["req_acme_0", "req_acme_1", "req_acme_2"]
    rest = viewer.get(page["next"]).json()
    assert [r["request_id"] for r in rest["results"]] == ["req_acme_3", "req_acme_4", "req_acme_5"]
    refused = viewer.get("/api/v1/usage/records/?status=429").json()["results"]
    assert sorted(r["request_id"] for r in refused) == ["req_acme_0", "req_acme_3", "req_acme_6"]
    assert [r["request_id"] for r in viewer.get("/api/v1/usage/records/?model=gpt-4.1-mini").json()["results"]] == [
        "req_acme_5"
    ]
    since = (timezone.now() - timedelta(minutes=1, seconds=30)).isoformat()
    recent = viewer.get("/api/v1/usage/records/", {"from": since}).json()["results"]
    assert sorted(r["request_id"] for r in recent) == ["req_acme_0", "req_acme_1"]
    assert viewer.get("/api/v1/usage/records/?request_id=req_umbra_0").json()["results"] == []
    assert viewer.get("/api/v1/usage/records/?tenant=umbra").status_code == 404
    bad = viewer.get("/api/v1/usage/records/?from=yesterday")
    assert bad.status_code == 400
    assert "from" in bad.json()
    assert viewer.get("/api/v1/usage/records/?status=abc").status_code == 400


def test_the_request_log_is_keyset_paged_on_time_and_id_both_ways(acme: Tenant) -> None:
    """Newest first by (created_at, id) whatever order the records were written in, ties on the
    time broken by id; ``next`` and ``previous`` walk every record once; each page is one query
    with neither OFFSET nor COUNT; a cursor of another list or a damaged one is a 400."""
    viewer = member(acme, "vic", "viewer")
    now = timezone.now()
    offsets = [5, 0, 9, 0, 3, 9, 9, 1]  # minutes ago, written out of time order, with ties
    rows = [record(acme, n, created_at=now - timedelta(minutes=m)) for n, m in enumerate(offsets)]
    newest_first = [r.request_id for r in sorted(rows, key=lambda r: (r.created_at, r.pk), reverse=True)]
    pages: list[list[str]] = []
    url: str | None = "/api/v1/usage/records/?limit=3"
    with CaptureQueriesContext(connection) as queries:
        while url:
            body = viewer.get(url).json()
            pages.append([r["request_id"] for r in body["results"]])
            url = body["next"]
    assert [row for page in pages for row in page] == newest_first
    assert [len(page) for page in pages] == [3, 3, 2]
    reads = [q["sql"].upper() for q in queries.captured_queries if "TENANCY_USAGERECORD" in q["sql"].upper()]
    assert len(reads) == 3
    assert all("OFFSET" not in sql and "COUNT(" not in sql and "LIMIT 4" in sql for sql in reads)
    back = body["previous"]
    for page in reversed(pages[:-1]):
        body = viewer.get(back).json()
        assert [r["request_id"] for r in body["results"]] == page
        back = body["previous"]
    assert back is None
    other_list = base64.urlsafe_b64encode(b"a:-latency,1.5,1").decode()
    for cursor in (other_list, "YTp4", "a:-time", "%FF", "YTotdGltZSwyMDI2LTAxLTAxVDAwOjAwOjAwKzAwOjAwLDA="):
        refused = viewer.get(f"/api/v1/usage/records/?cursor={cursor}")
        assert refused.status_code == 400, cursor
        assert "cursor" in refused.json()


def test_the_keyset_pagination_pages_any_queryset_it_is_given(acme: Tenant) -> None:
    """DRF's entry point (paginate_queryset), for a view that leaves paging to it."""
    now = timezone.now()
    rows = [record(acme, n, created_at=now - timedelta(minutes=m)) for n, m in enumerate([2, 0, 2, 1, 3])]
    newest_first = [r.request_id for r in sorted(rows, key=lambda r: (r.created_at, r.pk), reverse=True)]
    seen: list[str] = []
    url: str | None = "http://testserver/api/v1/usage/records/?limit=2"
    while url:
        paginator = TimeKeysetPagination()
        request = Request(APIRequestFactory().get(url))
        page = paginator.paginate_queryset(UsageRecord.objects.all(), request)
        seen += [r.request_id for r in page]
        url = paginator.get_paginated_response([]).data["next"]
    assert seen == newest_first


def test_a_viewer_reads_no_audit_log_and_an_outsider_none_of_another_tenant(acme: Tenant) -> None:
    owner = member(acme, "olga", "owner")
    owner.post("/api/v1/keys/", {"tenant": "acme"}, format="json")
    viewer = member(acme, "vic", "viewer")
    outsider = member(Tenant.objects.create(slug="umbra", name="Umbra"), "otto", "admin")
    assert viewer.get("/api/v1/audit/").json()["results"] == []
    seen = {e["tenant_id"] for e in outsider.get("/api/v1/audit/").json()["results"]}
    assert acme.pk not in seen
    assert owner.get("/api/v1/audit/?action=apikey.create").json()["results"][0]["action"] == "apikey.create"


def test_rotation_keeps_the_key_and_its_old_secret_for_the_grace_period(acme: Tenant) -> None:
    from tenancy.selectors import apikeys_for_snapshot_by_prefix

    admin = member(acme, "ann", "admin")
    created = admin.post("/api/v1/keys/", {"tenant": "acme", "name": "ci", "rpm": 100}, format="json").json()
    old_prefix = created["prefix"]
    rotated = admin.post(f"/api/v1/keys/{created['id']}/rotate/", {"grace_seconds": 3600}, format="json")
    assert rotated.status_code == 200
    body = rotated.json()
    assert body["id"] == created["id"]
    assert body["rpm"] == 100
    assert body["prefix"] != old_prefix
    assert body["key"].startswith(body["prefix"])
    assert body["previous_valid_until"] is not None
    rows = apikeys_for_snapshot_by_prefix([old_prefix, body["prefix"]])
    assert rows[old_prefix]["id"] == rows[body["prefix"]]["id"] == created["id"]
    assert rows[old_prefix]["digest"] == key_digest(created["key"])
    assert rows[body["prefix"]]["digest"] == key_digest(body["key"])
    assert rows[old_prefix]["expires_at"] is not None  # the grace's end
    entry = AuditEntry.objects.get(action="apikey.rotate")
    assert entry.before == {
        "prefix": old_prefix,
        "previous_prefix": "",
        "previous_valid_until": None,
        "secret": "[secret]",
    }
    assert entry.after is not None
    assert entry.after["prefix"] == body["prefix"]
    assert entry.after["secret"] == "[changed]"
    assert created["key"] not in str(entry.after) + str(entry.before)
    assert body["key"] not in str(entry.after)
    # Without a grace period, the old secret is gone at once.
    again = admin.post(f"/api/v1/keys/{created['id']}/rotate/", {}, format="json").json()
    rows = apikeys_for_snapshot_by_prefix([old_prefix, body["prefix"], again["prefix"]])
    assert list(rows) == [again["prefix"]]


def test_rotation_is_idempotent_with_an_idempotency_key(acme: Tenant) -> None:
    admin = member(acme, "ann", "admin")
    key_id = admin.post("/api/v1/keys/", {"tenant": "acme"}, format="json").json()["id"]
    url = f"/api/v1/keys/{key_id}/rotate/"
    first = admin.post(url, {"grace_seconds": 60}, format="json", HTTP_IDEMPOTENCY_KEY="rot-1")
    retry = admin.post(url, {"grace_seconds": 60}, format="json", HTTP_IDEMPOTENCY_KEY="rot-1")
    assert first.status_code == retry.status_code == 200
    assert first.json()["key"] == retry.json()["key"]
    assert AuditEntry.objects.filter(action="apikey.rotate").count() == 1
    conflict = admin.post(url, {"grace_seconds": 5}, format="json", HTTP_IDEMPOTENCY_KEY="rot-1")
    assert conflict.status_code == 409
    other = admin.post(url, {"grace_seconds": 60}, format="json", HTTP_IDEMPOTENCY_KEY="rot-2")
    assert other.json()["key"] != first.json()["key"]
    row = ApiKey.objects.get(pk=key_id)
    assert first.json()["key"] not in row.rotation_secret_encrypted  # kept encrypted
    assert admin.post(url, {"grace_seconds": -1}, format="json").status_code == 400
    assert admin.post(url, {"grace_seconds": 10**9}, format="json").status_code == 400


def test_apikey_rotate_command_prints_the_new_secret_last(acme: Tenant) -> None:
    from tenancy.services.keys import apikey_create
    from tests.unit.test_commands import run

    api_key, secret = apikey_create(tenant=acme)
    out = run("apikey_rotate", api_key.prefix, "--grace-seconds", "30")
    new = out.strip().splitlines()[-1]
    api_key.refresh_from_db()
    assert api_key.digest == key_digest(new)
    assert api_key.previous_digest == key_digest(secret)
    assert "works until" in out


def test_a_tenant_limit_lowered_later_does_not_block_a_keys_other_changes(acme: Tenant, operator: APIClient) -> None:
    admin = member(acme, "ann", "admin")
    key_id = admin.post("/api/v1/keys/", {"tenant": "acme", "rpm": 900}, format="json").json()["id"]
    assert operator.patch(f"/api/v1/tenants/{acme.pk}/", {"rpm": 100}, format="json").status_code == 200
    assert admin.patch(f"/api/v1/keys/{key_id}/", {"tpm": 5000}, format="json").status_code == 200
    assert admin.patch(f"/api/v1/keys/{key_id}/", {"rpm": 800}, format="json").status_code == 400
