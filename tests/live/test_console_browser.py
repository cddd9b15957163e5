"""The console in a real browser (issue 13): Playwright drives Debian's chromium (headless)
against a live gateway process and the fake upstream, over real sockets.

The walk: an operator signs in, creates a tenant and a key (reads its secret once and copies
it), adds an upstream account and tests it, sends a request with the key and sees it in the
overview (and in the request log once that page exists); a tenant admin of another tenant
gets 404 on all of it; a viewer sees no button that changes anything and a POST is refused.
A screenshot of every page visited is saved under var/screenshots/ (git-ignored); the command
is in docs/console.md. No Content-Security-Policy violation and no script error on any page.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, FakeUpstream
from tests.harness import ROOT

pytestmark = pytest.mark.live

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "var" / "screenshots"
PASSWORD = "correct horse battery staple"
CREDENTIAL = "sk-upstream-browser-walk-7e2"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
expect = sync_api.expect  # assertions that wait for the page (a click's navigation may still be under way)
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless chromium for the module. Playwright's sync API runs an event loop in this
    thread, which Django's ORM would take for async code: the tests' own ORM calls are allowed."""
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()
    if previous is None:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


class Console:
    """A browser tab on the console that records CSP violations and script errors."""

    def __init__(self, browser: Any, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.problems: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.problems.append(f"script error: {error}"))
        self.shots = 0

    def _console(self, message: Any) -> None:
        if message.type == "error" and "404" not in message.text:
            self.problems.append(message.text)

    def goto(self, path: str) -> Any:
        return self.page.goto(self.url + path)

    def shot(self, name: str) -> None:
        self.shots += 1
        self.page.screenshot(path=str(SHOTS / f"{self.prefix}-{self.shots:02d}-{name}.png"), full_page=True)

    def sign_in(self, username: str) -> None:
        self.goto("/console/")
        self.page.get_by_label("Username").fill(username)
        self.page.get_by_label("Password").fill(PASSWORD)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_url(re.compile(r"/console/(\?.*)?$"))

    def nav(self, name: str) -> None:
        self.page.get_by_role("navigation", name="Main").get_by_role("link", name=name, exact=True).click()

    def post(self, path: str) -> int:
        """A form POST with the session and its CSRF token, as a crafted request would send."""
        token = next(c["value"] for c in self.context.cookies() if c["name"] == "csrftoken")
        response = self.page.request.post(self.url + path, form={"csrfmiddlewaretoken": token}, max_redirects=0)
        return int(response.status)

    def close(self) -> None:
        self.context.close()
        assert self.problems == [], self.problems


@pytest.fixture
def console(browser: Any, live_gateway: str, transactional_db: None) -> Iterator[Any]:
    tabs: list[Console] = []

    def open_tab(prefix: str) -> Console:
        tab = Console(browser, live_gateway, prefix)
        tabs.append(tab)
        return tab

    yield open_tab
    for tab in tabs:
        tab.close()


def _send(url: str, key: str) -> httpx.Response:
    body = {"model": MODEL, "input": "hello from the console walk"}
    return httpx.post(f"{url}/v1/responses", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)


def _wait_usage(request_id: str) -> Any:
    from tenancy.models import UsageRecord
    from tests.harness import poll

    return poll(lambda: UsageRecord.objects.filter(request_id=request_id).first(), timeout=15, what="usage record")


def test_an_operator_walks_through_the_console(console: Any, fake_upstream: FakeUpstream) -> None:
    from django.contrib.auth.models import User

    from tenancy.models import ApiKey

    User.objects.create_user("olga", password=PASSWORD, is_staff=True)
    tab = console("operator")
    page = tab.page
    tab.goto("/console/")
    assert "/console/login/" in page.url
    tab.shot("login")
    tab.sign_in("olga")
    tab.shot("overview-empty")

    # a tenant, with an error next to its field first
    tab.nav("Tenants")
    page.get_by_role("link", name="New tenant").click()
    page.get_by_label("Slug").fill("not a slug")
    page.get_by_role("button", name="Create tenant").click()
    expect(page.locator("#id_slug_errors")).to_be_visible()
    tab.shot("tenant-new-error")
    page.get_by_label("Slug").fill("acme")
    page.get_by_label("Name", exact=True).fill("Acme Corp")
    page.get_by_label("Requests per minute").fill("600")
    page.get_by_role("button", name="Create tenant").click()
    page.wait_for_url("**/console/tenants/acme/")
    expect(page.get_by_role("heading", level=1)).to_have_text(re.compile(r"^Acme Corp"))
    tab.shot("tenant")
    page.get_by_role("link", name="Edit limits and budget").click()
    tab.shot("tenant-limits")
    page.get_by_role("link", name="Cancel").click()
    page.get_by_role("link", name="Suspend").click()
    tab.shot("tenant-suspend-confirm")
    page.get_by_role("link", name="Cancel").click()
    tab.nav("Tenants")
    tab.shot("tenants")

    # a key: the secret is shown once, with a copy button
    tab.goto("/console/tenants/acme/keys/")
    tab.shot("keys-empty")
    page.get_by_role("link", name="New key").click()
    page.get_by_label("Name", exact=True).fill("walk key")
    page.get_by_label("Allowed models").fill(MODEL)
    tab.shot("key-new")
    page.get_by_role("button", name="Create key").click()
    expect(page.locator("#secret-value")).to_be_visible()
    secret = page.locator("#secret-value").inner_text().strip()
    assert secret.startswith("sk-")
    page.get_by_role("button", name="Copy to clipboard").click()
    page.get_by_text("Copied to the clipboard.").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == secret
    tab.shot("key-secret")
    page.get_by_role("link", name=re.compile("go to the key")).click()
    assert secret not in page.content()
    tab.shot("key")
    api_key = ApiKey.objects.get(name="walk key")
    page.get_by_role("link", name="Rotate").click()
    tab.shot("key-rotate-confirm")
    tab.goto(f"/console/tenants/acme/keys/{api_key.pk}/revoke/")
    tab.shot("key-revoke-confirm")
    tab.goto("/console/tenants/acme/keys/")
    tab.shot("keys")

    # an upstream account, its credential write-only, and its Test button
    tab.nav("Upstreams")
    tab.shot("upstreams-empty")
    page.get_by_role("link", name="Add account").first.click()
    page.get_by_label("Pool").fill("main")
    page.get_by_label("Name", exact=True).fill("fake upstream")
    page.get_by_label("Base URL").fill(fake_upstream.base_url)
    page.get_by_label("Credential").fill(CREDENTIAL)
    page.get_by_label("Models").fill(MODEL)
    tab.shot("account-new")
    page.get_by_role("button", name="Add account").click()
    page.wait_for_url(re.compile(r"/console/accounts/\d+/$"))
    assert CREDENTIAL not in page.content()
    page.get_by_role("button", name=re.compile("^Test")).click()
    answer = page.locator("#probe-answer")
    answer.wait_for()
    expect(answer).to_contain_text("success")
    expect(answer).to_contain_text("200")
    tab.shot("account-tested")
    page.get_by_role("link", name="Disable").click()
    tab.shot("account-disable-confirm")
    page.get_by_role("link", name="Cancel").click()
    tab.goto("/console/pools/")
    assert CREDENTIAL not in page.content()
    tab.shot("upstreams")
    tab.goto("/console/pools/main/")
    tab.shot("pool")
    tab.goto("/console/models/")
    tab.shot("models")

    # a request with the new key, seen in the overview
    sent = _send(tab.url, secret)
    assert sent.status_code == 200, sent.text
    _wait_usage(sent.headers["x-request-id"])
    tab.goto("/console/?range=1h")
    expect(page.locator(".kpi dd").first).to_have_text("1")
    page.locator('[data-chart][data-drawn="1"]').nth(2).wait_for()
    assert page.locator('[data-chart][data-drawn="1"]').count() == 3
    assert page.locator("canvas").count() >= 3
    expect(page.locator("main")).to_contain_text("walk key")
    tab.shot("overview")
    tab.goto("/console/security/")
    expect(page.locator(".qr svg")).to_be_visible()
    tab.shot("security-totp")


def test_the_request_appears_in_the_live_view_and_the_request_log(console: Any, fake_upstream: FakeUpstream) -> None:
    from django.contrib.auth.models import User

    from accounts.services import pool_get_or_create, upstream_account_create
    from tenancy.services.keys import apikey_create
    from tenancy.services.tenants import tenant_create

    User.objects.create_user("olga", password=PASSWORD, is_staff=True)
    upstream_account_create(pool=pool_get_or_create(name="main"), base_url=fake_upstream.base_url, models=[MODEL])
    _, secret = apikey_create(tenant=tenant_create(slug="acme", name="Acme"), name="log key")
    tab = console("requests")
    tab.sign_in("olga")
    # The live view first: the request shows up there as it finishes, pushed over its socket.
    tab.goto("/console/live/")
    expect(tab.page.locator("#live-status")).to_contain_text("Connected")
    tab.page.wait_for_timeout(600)  # the data plane's feed notices its watcher within a flush
    sent = _send(tab.url, secret)
    assert sent.status_code == 200, sent.text
    request_id = sent.headers["x-request-id"]
    expect(tab.page.locator("#live-lines")).to_contain_text(request_id, timeout=10_000)
    tab.shot("live")
    _wait_usage(request_id)
    tab.goto("/console/requests/")
    tab.page.get_by_text(request_id).first.wait_for()
    tab.shot("requests")
    # sorted by a column header: a link, and the header says how the table is sorted
    tab.page.get_by_role("link", name="Latency (ms)").click()
    expect(tab.page.locator('th[aria-sort="descending"]')).to_contain_text("Latency (ms)")
    tab.page.get_by_text(request_id).first.wait_for()
    tab.shot("requests-by-latency")
    tab.page.get_by_text(request_id).first.click()
    expect(tab.page.locator("h1")).to_contain_text(request_id)
    tab.shot("request")
    tab.goto("/console/audit/")
    tab.shot("audit")
    tab.page.get_by_role("link", name="Who").click()
    expect(tab.page.locator('th[aria-sort="ascending"]')).to_contain_text("Who")
    tab.shot("audit-by-who")
    tab.goto("/console/usage/")
    tab.shot("usage")


def test_an_outsider_gets_404_and_a_viewer_changes_nothing(console: Any, fake_upstream: FakeUpstream) -> None:
    from accounts.services import pool_get_or_create, upstream_account_create
    from tenancy.models import ApiKey, Role, Tenant
    from tenancy.services.keys import apikey_create
    from tenancy.services.members import member_add
    from tenancy.services.tenants import tenant_create

    acme = tenant_create(slug="acme", name="Acme Corp")
    other = tenant_create(slug="other", name="Other Inc")
    member_add(tenant=other, username="tess", role=Role.ADMIN, password=PASSWORD)
    member_add(tenant=acme, username="vera", role=Role.VIEWER, password=PASSWORD)
    api_key, _ = apikey_create(tenant=acme, name="acme key")
    account = upstream_account_create(
        pool=pool_get_or_create(name="main"), base_url=fake_upstream.base_url, models=[MODEL]
    )

    outsider = console("outsider")
    outsider.sign_in("tess")
    assert "Acme Corp" not in outsider.page.content()
    outsider.shot("overview")
    for path in [
        "/console/tenants/acme/",
        "/console/tenants/acme/keys/",
        f"/console/tenants/acme/keys/{api_key.pk}/",
        f"/console/tenants/acme/keys/{api_key.pk}/revoke/",
        "/console/pools/",
        f"/console/accounts/{account.pk}/",
        "/console/models/",
    ]:
        assert outsider.goto(path).status == 404, path
    outsider.shot("not-found")
    assert outsider.post(f"/console/tenants/acme/keys/{api_key.pk}/revoke/") == 404
    outsider.goto("/console/tenants/")
    assert "Acme Corp" not in outsider.page.content()
    outsider.shot("tenants")

    viewer = console("viewer")
    viewer.sign_in("vera")
    for name, path in [
        ("tenant", "/console/tenants/acme/"),
        ("keys", "/console/tenants/acme/keys/"),
        ("key", f"/console/tenants/acme/keys/{api_key.pk}/"),
    ]:
        assert viewer.goto(path).status == 200, path
        assert viewer.page.locator("[data-write]").count() == 0, path
        assert viewer.page.locator("main button, main form[method=post]").count() == 0, path
        viewer.shot(name)
    assert viewer.post(f"/console/tenants/acme/keys/{api_key.pk}/revoke/") == 403
    assert viewer.post("/console/tenants/acme/suspend/") == 403
    assert ApiKey.objects.get(pk=api_key.pk).revoked_at is None
    assert Tenant.objects.get(pk=acme.pk).is_active
