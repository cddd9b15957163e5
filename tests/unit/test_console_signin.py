"""The console's sign-in (issue 13): login page, session, throttling, POST-only sign-out."""

from __future__ import annotations

import re

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.cache import cache
from django.test import Client

from tenancy.models import Role, Tenant
from tenancy.services.members import member_add

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _clear() -> None:
    cache.clear()


def test_anonymous_visit_goes_to_the_login_page_with_username_and_password() -> None:
    client = Client(enforce_csrf_checks=True)
    response = client.get("/console/")
    assert response.status_code == 302
    assert response["Location"].startswith("/console/login/")
    page = client.get(response["Location"])
    assert page.status_code == 200
    html = page.content.decode()
    assert 'name="username"' in html
    assert 'name="password"' in html
    assert 'name="csrfmiddlewaretoken"' in html
    assert "Sign in with SSO" not in html


def test_a_member_signs_in_sees_their_tenant_and_signs_out_by_post() -> None:
    tenant = Tenant.objects.create(slug="acme", name="Acme Corp")
    Tenant.objects.create(slug="other", name="Other Inc")
    member_add(tenant=tenant, username="alice", role=Role.VIEWER, password=PASSWORD)
    client = Client()
    response = client.post("/console/login/", {"username": "alice", "password": PASSWORD})
    assert response.status_code == 302
    assert response["Location"] == "/console/"
    assert client.session.get_expiry_age() == settings.SESSION_COOKIE_AGE
    home = client.get("/console/").content.decode()
    assert "Acme Corp" in home
    assert "Other Inc" not in home
    assert client.get("/console/logout/").status_code == 405
    assert client.post("/console/logout/").status_code == 302
    assert client.get("/console/").status_code == 302


def test_repeated_wrong_passwords_are_throttled() -> None:
    User.objects.create_user("bob", password=PASSWORD)
    client = Client()
    statuses = [
        client.post("/console/login/", {"username": "bob", "password": "wrong"}).status_code
        for _ in range(settings.AXES_FAILURE_LIMIT + 1)
    ]
    assert statuses[0] == 200
    assert statuses[-1] == 429
    assert client.post("/console/login/", {"username": "bob", "password": PASSWORD}).status_code == 429


def test_console_pages_send_a_strict_csp_and_the_api_docs_still_load() -> None:
    client = Client()
    response = client.get("/console/login/")
    csp = response["Content-Security-Policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Frame-Options"] == "DENY"
    scripts = re.findall(r"<script[^>]*>", response.content.decode())
    assert scripts  # htmx and the console's own file, both served by the gateway
    assert all(re.search(r' src="/static/console/', tag) for tag in scripts), scripts
    assert client.get("/api/docs/").status_code == 200


def test_a_tenant_page_is_404_outside_the_callers_tenants_and_has_no_write_for_a_viewer() -> None:
    mine = Tenant.objects.create(slug="mine", name="Mine")
    Tenant.objects.create(slug="theirs", name="Theirs")
    member_add(tenant=mine, username="vera", role=Role.VIEWER, password=PASSWORD)
    member_add(tenant=mine, username="adam", role=Role.ADMIN, password=PASSWORD)
    viewer = Client()
    viewer.post("/console/login/", {"username": "vera", "password": PASSWORD})
    page = viewer.get("/console/tenants/mine/")
    assert page.status_code == 200
    assert "adam" in page.content.decode()
    assert 'data-write="1"' not in page.content.decode()
    assert viewer.get("/console/tenants/theirs/").status_code == 404
    assert viewer.get("/console/tenants/nope/").status_code == 404
    admin = Client()
    admin.post("/console/login/", {"username": "adam", "password": PASSWORD})
    assert 'data-write="1"' in admin.get("/console/tenants/mine/").content.decode()
    assert admin.get("/console/tenants/theirs/").status_code == 404
