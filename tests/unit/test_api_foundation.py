"""The management API's foundation: tokens, authentication, `me`, members, the audit log, the schema."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError
from rest_framework.test import APIClient

from accounts.infra.audit import SECRET_CHANGED, SECRET_SET, Actor, acting_as, audit_change, audit_snapshot
from tenancy.models import AccessToken, AuditEntry, Membership, Role, Tenant
from tenancy.services.keys import apikey_create
from tenancy.services.members import member_add, member_remove, member_role_set
from tenancy.services.tokens import access_token_create, access_token_revoke
from tests.unit.test_commands import run

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _clear_throttles() -> None:
    cache.clear()


def bearer(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def test_token_create_command_prints_the_token_last_and_stores_only_its_digest() -> None:
    User.objects.create_user("ops", is_staff=True)
    out = run("token_create", "ops", "--name", "ci", "--expires-in-days", "7")
    token = out.strip().splitlines()[-1]
    assert re.fullmatch(r"gwt-[A-Za-z0-9]{50}", token)
    row = AccessToken.objects.get()
    assert row.name == "ci"
    assert row.expires_at is not None
    assert token not in {row.prefix, row.digest}
    assert token.startswith(row.prefix)
    me = bearer(token).get("/api/v1/me")
    assert me.status_code == 200
    assert me.json() == {"id": row.user_id, "username": "ops", "is_operator": True, "memberships": []}


def test_token_create_command_refuses_unknown_users_and_bad_days() -> None:
    with pytest.raises(CommandError, match="no user"):
        run("token_create", "nobody")
    User.objects.create_user("ops")
    with pytest.raises(CommandError, match="expires_in_days"):
        run("token_create", "ops", "--expires-in-days", "0")


def test_me_lists_memberships() -> None:
    acme, beta = Tenant.objects.create(slug="acme", name="Acme"), Tenant.objects.create(slug="beta", name="Beta")
    member_add(tenant=acme, username="ann", role="admin")
    member_add(tenant=beta, username="ann", role="viewer")
    _, token = access_token_create(user=User.objects.get(username="ann"))
    body = bearer(token).get("/api/v1/me").json()
    assert body["is_operator"] is False
    assert [(m["tenant"], m["role"]) for m in body["memberships"]] == [("acme", "admin"), ("beta", "viewer")]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "Authentication credentials were not provided."),
        ("Bearer", "Invalid Authorization header"),
        ("Bearer gwt-" + "a" * 50, "Invalid token."),
        ("Bearer nonsense", "Invalid token."),
    ],
)
def test_without_valid_credentials_the_api_answers_401(header: str | None, message: str) -> None:
    client = APIClient()
    if header:
        client.credentials(HTTP_AUTHORIZATION=header)
    response = client.get("/api/v1/me")
    assert response.status_code == 401
    assert message in response.json()["detail"]
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'


def test_a_data_plane_key_never_authenticates_the_management_api() -> None:
    _, secret = apikey_create(tenant=Tenant.objects.create(slug="acme", name="Acme"))
    response = bearer(secret).get("/api/v1/me")
    assert response.status_code == 401
    assert "data plane" in response.json()["detail"]
    assert secret not in response.content.decode()


def test_revoked_expired_and_inactive_tokens_are_refused() -> None:
    user = User.objects.create_user("ann")
    row, token = access_token_create(user=user)
    assert bearer(token).get("/api/v1/me").status_code == 200
    access_token_revoke(token=row)
    assert bearer(token).get("/api/v1/me").status_code == 401
    row2, token2 = access_token_create(user=user, expires_in_days=1)
    AccessToken.objects.filter(pk=row2.pk).update(expires_at="2020-01-01T00:00:00Z")
    assert bearer(token2).get("/api/v1/me").status_code == 401
    _, token3 = access_token_create(user=user)
    User.objects.filter(pk=user.pk).update(is_active=False)
    assert bearer(token3).get("/api/v1/me").status_code == 401


def test_repeated_authentication_failures_from_one_address_are_throttled(settings: Any) -> None:
    settings.GATEWAY_API_AUTH_FAILURES = 3
    bad = bearer("gwt-" + "b" * 50)
    assert [bad.get("/api/v1/me").status_code for _ in range(4)] == [401, 401, 401, 429]
    # The address stays throttled even with a valid token, until the window passes.
    _, token = access_token_create(user=User.objects.create_user("ann"))
    assert bearer(token).get("/api/v1/me").status_code == 429


def test_tokens_endpoint_creates_lists_and_revokes_only_the_callers_tokens() -> None:
    ann, bob = User.objects.create_user("ann"), User.objects.create_user("bob")
    _, ann_token = access_token_create(user=ann, name="first")
    bob_row, _ = access_token_create(user=bob)
    client = bearer(ann_token)
    created = client.post("/api/v1/tokens/", {"name": "ci", "expires_in_days": 30}, format="json")
    assert created.status_code == 201
    new_token = created.json()["token"]
    assert bearer(new_token).get("/api/v1/me").json()["username"] == "ann"
    listed = client.get("/api/v1/tokens/").json()
    assert sorted(t["name"] for t in listed["results"]) == ["ci", "first"]
    assert new_token not in str(listed)
    assert client.get(f"/api/v1/tokens/{bob_row.pk}/").status_code == 404  # another's token: 404
    assert client.delete(f"/api/v1/tokens/{bob_row.pk}/").status_code == 404
    assert client.delete(f"/api/v1/tokens/{created.json()['id']}/").status_code == 204
    assert bearer(new_token).get("/api/v1/me").status_code == 401
    bad = client.post("/api/v1/tokens/", {"expires_in_days": 0}, format="json")
    assert bad.status_code == 400
    assert "expires_in_days" in bad.json()


def test_member_add_command_creates_the_user_with_a_password_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    Tenant.objects.create(slug="acme", name="Acme")
    monkeypatch.setenv("ANN_PASSWORD", "a-long-enough-password-123")
    out = run("member_add", "acme", "ann", "--role", "owner", "--password-env", "ANN_PASSWORD")
    assert "ann is owner of tenant acme" in out
    assert User.objects.get(username="ann").check_password("a-long-enough-password-123")
    run("member_add", "acme", "bob", "--role", "viewer")
    assert not User.objects.get(username="bob").has_usable_password()
    run("member_add", "acme", "bob", "--role", "admin")  # an existing member: the role changes
    assert Membership.objects.get(user__username="bob").role == Role.ADMIN
    with pytest.raises(CommandError, match="last owner"):
        run("member_remove", "acme", "ann")
    run("member_remove", "acme", "bob")
    assert not Membership.objects.filter(user__username="bob").exists()
    with pytest.raises(CommandError, match="not a member"):
        run("member_remove", "acme", "bob")
    with pytest.raises(CommandError, match="ANN_PASSWORD2"):
        run("member_add", "acme", "carl", "--role", "viewer", "--password-env", "ANN_PASSWORD2")


def test_last_owner_is_kept() -> None:
    acme = Tenant.objects.create(slug="acme", name="Acme")
    owner = member_add(tenant=acme, username="ann", role="owner")
    with pytest.raises(ValidationError, match="last owner"):
        member_role_set(membership=owner, role="admin")
    member_add(tenant=acme, username="bob", role="owner")
    member_role_set(membership=owner, role="admin")
    with pytest.raises(ValidationError, match="role must be one of"):
        member_add(tenant=acme, username="carl", role="god")


def test_changes_are_audited_with_actor_before_and_after() -> None:
    acme = Tenant.objects.create(slug="acme", name="Acme")
    actor = Actor(source="api", label="ops", user_id=7, token_prefix="gwt-abc", ip="10.0.0.1", request_id="req_1")
    with acting_as(actor):
        membership = member_add(tenant=acme, username="ann", role="viewer")
        member_role_set(membership=membership, role="admin")
        member_remove(membership=membership)
    entries = list(AuditEntry.objects.order_by("id"))
    assert [e.action for e in entries] == ["member.add", "member.update", "member.remove"]
    added, updated, removed = entries
    assert added.before is None
    assert added.after == {"user": membership.user_id, "tenant": acme.pk, "role": "viewer"}
    assert (updated.before, updated.after) == ({"role": "viewer"}, {"role": "admin"})
    assert removed.after is None
    assert removed.before == {"user": membership.user_id, "tenant": acme.pk, "role": "admin"}
    assert all(e.tenant_id == acme.pk for e in entries)
    assert (added.actor_id, added.actor_label, added.token_prefix, added.source, added.ip, added.request_id) == (
        7,
        "ops",
        "gwt-abc",
        "api",
        "10.0.0.1",
        "req_1",
    )
    assert added.target_label == "ann in acme"


def test_commands_are_audited_as_the_command_and_secrets_never_appear() -> None:
    Tenant.objects.create(slug="acme", name="Acme")
    run("member_add", "acme", "ann", "--role", "owner")
    out = run("token_create", "ann")
    entries = list(AuditEntry.objects.order_by("id"))
    assert [e.action for e in entries] == ["member.add", "token.create"]
    assert all(e.source == "command" and "manage.py" in e.actor_label for e in entries)
    token = out.strip().splitlines()[-1]
    row = AccessToken.objects.get()
    dumped = str([(e.before, e.after, e.target_label) for e in entries])
    assert token not in dumped
    assert row.digest not in dumped


def test_secret_fields_are_recorded_as_set_or_changed_never_by_value() -> None:
    tenant = Tenant.objects.create(slug="acme", name="Acme")
    row, _ = apikey_create(tenant=tenant, name="laptop")
    before = audit_snapshot(row, ["name"], secret=["digest"])
    assert before == {"name": "laptop", "digest": SECRET_SET}
    audit_change("apikey.rotate", target=row, before=before, after=dict(before), secrets_changed=["digest"])
    entry = AuditEntry.objects.get(action="apikey.rotate")
    assert (entry.before, entry.after) == ({"digest": SECRET_SET}, {"digest": SECRET_CHANGED})
    assert row.digest not in str(entry.before) + str(entry.after)
    audit_change("apikey.update", target=row, before=before, after=dict(before))  # no change: no entry
    assert not AuditEntry.objects.filter(action="apikey.update").exists()


def test_the_audit_log_is_append_only() -> None:
    tenant = Tenant.objects.create(slug="acme", name="Acme")
    member_add(tenant=tenant, username="ann", role="owner")
    entry = AuditEntry.objects.get()
    entry.action = "forged"
    with pytest.raises(PermissionError):
        entry.save()
    with pytest.raises(PermissionError):
        entry.delete()
    with pytest.raises(PermissionError):
        AuditEntry.objects.all().update(action="forged")
    with pytest.raises(PermissionError):
        AuditEntry.objects.all().delete()
    assert AuditEntry.objects.get().action == "member.add"


def test_the_schema_and_its_docs_are_served_without_a_cdn() -> None:
    client = APIClient()
    schema = client.get("/api/schema/?format=json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert {"/api/v1/me", "/api/v1/tokens/", "/api/v1/tokens/{id}/"} <= set(paths)
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "swagger-ui" in html
    external = re.findall(r"""(?:src|href)=["'](https?://[^"']+)""", html)
    assert external == []
    assets = re.findall(r"""(?:src|href)=["'](/static/[^"']+)""", html)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets)
    for asset in assets:
        assert client.get(asset).status_code == 200, asset


def test_createsuperuser_noinput_makes_an_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DJANGO_SUPERUSER_USERNAME", "root")
    monkeypatch.setenv("DJANGO_SUPERUSER_EMAIL", "root@example.com")
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "a-long-enough-password-123")
    run("createsuperuser", "--noinput")
    token = run("token_create", "root").strip().splitlines()[-1]
    assert bearer(token).get("/api/v1/me").json()["is_operator"] is True
