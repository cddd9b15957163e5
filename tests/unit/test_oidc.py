"""OpenID Connect sign-in against a fake provider served over real HTTP (tests/oidc_provider.py).

The browser is Django's test client; every call the gateway makes to the provider (token, JWKS,
userinfo) is a real HTTP request to a local server that signs real RS256 ID tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from django.contrib.auth.models import User
from django.core.cache import cache
from django.test import Client

from gateway.conf.checks import check_oidc
from tenancy.models import AuditEntry, Membership, Role, Tenant
from tenancy.services.members import member_add
from tenancy.services.sso import claim_values, tenant_roles_parse
from tests.oidc_provider import FakeOidcProvider, other_key

pytestmark = pytest.mark.django_db


@pytest.fixture
def provider() -> Iterator[FakeOidcProvider]:
    fake = FakeOidcProvider()
    yield fake
    fake.close()


@pytest.fixture
def oidc(settings: Any, provider: FakeOidcProvider) -> FakeOidcProvider:
    for name, value in provider.settings().items():
        setattr(settings, name, value)
    settings.GATEWAY_OIDC_OPERATOR_CLAIM = "groups"
    settings.GATEWAY_OIDC_OPERATOR_VALUE = "gateway-operators"
    cache.clear()
    return provider


@pytest.fixture
def tenants() -> dict[str, Tenant]:
    return {slug: Tenant.objects.create(slug=slug, name=slug.title()) for slug in ("acme", "beta", "gamma")}


def sign_in(client: Client, provider: FakeOidcProvider, identity: dict[str, Any], next_url: str = "") -> Any:
    """The browser's round trip: gateway -> provider's /authorize (real HTTP) -> gateway's callback."""
    provider.identity = identity
    start = client.get("/oidc/authenticate/" + (f"?next={next_url}" if next_url else ""))
    assert start.status_code == 302
    location = start["Location"]
    assert location.startswith(provider.base + "/authorize?")
    query = parse_qs(urlsplit(location).query)
    assert query["redirect_uri"] == ["http://testserver/oidc/callback/"]
    back = requests.get(location, allow_redirects=False, timeout=5)
    assert back.status_code == 302
    callback = urlsplit(back.headers["Location"])
    return client.get(callback.path + "?" + callback.query)


def test_while_oidc_is_off_its_routes_are_404_and_its_backend_authenticates_nobody(client: Client) -> None:
    for path in ("/oidc/authenticate/", "/oidc/callback/?code=x&state=y", "/oidc/failed/"):
        assert client.get(path).status_code == 404
    assert client.post("/oidc/logout/").status_code == 404


def test_sign_in_creates_the_user_and_their_memberships_from_the_claim(
    client: Client, oidc: FakeOidcProvider, tenants: dict[str, Tenant]
) -> None:
    identity = {
        "sub": "u-1",
        "email": "ann@example.com",
        "gateway_tenants": ["acme:admin", "beta:viewer", "nowhere:owner", "gamma:chief"],
    }
    landed = sign_in(client, oidc, identity, next_url="/api/v1/me")
    assert landed.status_code == 302
    assert landed["Location"] == "/api/v1/me"
    user = User.objects.get(username="ann@example.com")
    assert user.email == "ann@example.com"
    assert not user.has_usable_password()
    assert not user.is_staff
    roles = {m.tenant.slug: m.role for m in Membership.objects.filter(user=user)}
    assert roles == {"acme": "admin", "beta": "viewer"}  # unknown tenant and unknown role ignored
    # The browser is signed in: the API answers through the session.
    me = client.get("/api/v1/me").json()
    assert me["username"] == "ann@example.com"
    assert [(m["tenant"], m["role"]) for m in me["memberships"]] == [("acme", "admin"), ("beta", "viewer")]
    entries = AuditEntry.objects.filter(action="member.add").order_by("id")
    assert [(e.target_label, e.actor_label) for e in entries] == [
        ("ann@example.com in acme", "ann@example.com"),
        ("ann@example.com in beta", "ann@example.com"),
    ]
    assert {e.source for e in entries} == {"oidc"}


def test_a_later_sign_in_syncs_roles_memberships_and_operator_status(
    client: Client, oidc: FakeOidcProvider, tenants: dict[str, Tenant]
) -> None:
    base = {"sub": "u-1", "email": "ann@example.com"}
    sign_in(client, oidc, {**base, "gateway_tenants": "acme:owner beta:viewer"})
    client.logout()
    sign_in(client, oidc, {**base, "gateway_tenants": "acme:viewer,gamma:admin", "groups": ["gateway-operators"]})
    user = User.objects.get(username="ann@example.com")
    roles = {m.tenant.slug: m.role for m in Membership.objects.filter(user=user)}
    # acme's last owner is kept (the service refuses to leave a tenant ownerless), beta removed, gamma added.
    assert roles == {"acme": "owner", "gamma": "admin"}
    assert user.is_staff
    assert client.get("/api/v1/me").json()["is_operator"] is True
    # Someone else owns acme now: the next sign-in can demote ann; the group is gone, so is operator status.
    member_add(tenant=tenants["acme"], username="bob", role="owner")
    client.logout()
    sign_in(client, oidc, {**base, "gateway_tenants": ["acme:viewer"], "groups": []})
    user.refresh_from_db()
    assert {m.tenant.slug: m.role for m in Membership.objects.filter(user=user)} == {"acme": "viewer"}
    assert not user.is_staff
    updates = AuditEntry.objects.filter(action="user.sso_update", target_label="ann@example.com").order_by("id")
    assert [(e.before, e.after) for e in updates] == [
        ({"email": ""}, {"email": "ann@example.com"}),
        ({"is_staff": False}, {"is_staff": True}),
        ({"is_staff": True}, {"is_staff": False}),
    ]


@pytest.mark.parametrize(
    "tamper",
    [
        {"aud": "another-client"},
        {"iss": "http://evil.example"},
        {"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200},
        {"nonce": "replayed"},
        {"_key": other_key()},
    ],
    ids=["audience", "issuer", "expired", "nonce", "forged"],
)
def test_a_bad_id_token_fails_the_sign_in_without_creating_anyone(
    client: Client, oidc: FakeOidcProvider, tenants: dict[str, Tenant], tamper: dict[str, Any]
) -> None:
    oidc.tamper = tamper
    landed = sign_in(client, oidc, {"sub": "u-2", "email": "eve@example.com", "gateway_tenants": ["acme:owner"]})
    assert landed.status_code == 302
    assert landed["Location"] == "/oidc/failed/"
    assert oidc.token_requests == 1  # the code was exchanged; its token refused
    assert not User.objects.filter(username="eve@example.com").exists()
    assert client.get("/api/v1/me").status_code in (401, 403)
    failed = client.get("/oidc/failed/")
    assert failed.status_code == 401
    assert "Sign-in failed" in failed.content.decode()


def test_an_unreachable_provider_fails_the_sign_in_not_the_gateway(
    client: Client, oidc: FakeOidcProvider, settings: Any
) -> None:
    oidc.identity = {"sub": "u-3", "email": "sam@example.com"}
    location = client.get("/oidc/authenticate/")["Location"]
    back = urlsplit(requests.get(location, allow_redirects=False, timeout=5).headers["Location"])
    oidc.close()  # the provider goes away before the code is exchanged
    landed = client.get(back.path + "?" + back.query)
    assert landed.status_code == 302
    assert landed["Location"] == "/oidc/failed/"
    assert not User.objects.filter(username="sam@example.com").exists()


def test_a_callback_without_a_started_sign_in_is_refused(client: Client, oidc: FakeOidcProvider) -> None:
    response = client.get("/oidc/callback/?code=abc&state=never-issued")
    assert response.status_code == 302
    assert response["Location"] == "/oidc/failed/"
    assert oidc.token_requests == 0


def test_the_tenant_claim_parser() -> None:
    roles, ignored = tenant_roles_parse(["acme:viewer", "acme:owner", "beta:admin", "no-role", "x:boss", ":admin"])
    assert roles == {"acme": Role.OWNER, "beta": Role.ADMIN}  # the strongest role wins
    assert ignored == ["no-role", "x:boss", ":admin"]
    assert claim_values({"t": "a:admin, b:viewer"}, "t") == ["a:admin", "b:viewer"]
    assert claim_values({"t": ["a:admin"]}, "t") == ["a:admin"]
    assert claim_values({"t": 3}, "t") == []
    assert claim_values({}, "t") == []


def test_half_configured_oidc_is_a_system_check_error(settings: Any, provider: FakeOidcProvider) -> None:
    settings.GATEWAY_OIDC_ENABLED = False
    assert check_oidc() == []
    for name, value in provider.settings().items():
        setattr(settings, name, value)
    assert check_oidc() == []
    settings.GATEWAY_OIDC_CLIENT_SECRET = ""
    settings.GATEWAY_OIDC_JWKS_ENDPOINT = ""
    settings.GATEWAY_OIDC_OPERATOR_CLAIM = "groups"
    [error] = check_oidc()
    assert error.id == "gateway.E020"
    assert "GATEWAY_OIDC_CLIENT_SECRET is not set" in error.msg
    assert "GATEWAY_OIDC_JWKS_ENDPOINT is not set" in error.msg
    assert "GATEWAY_OIDC_OPERATOR_CLAIM and GATEWAY_OIDC_OPERATOR_VALUE go together" in error.msg
    assert provider.settings()["GATEWAY_OIDC_CLIENT_SECRET"] not in error.msg
    settings.GATEWAY_OIDC_SIGN_ALGO = "none"
    assert "GATEWAY_OIDC_SIGN_ALGO='none' is not one of" in check_oidc()[0].msg
