"""The admin and the forwarded client address through a live `manage.py serve` behind a
(simulated) TLS-terminating reverse proxy (issue 10, item 19).

The test client plays the proxy: it connects from 127.0.0.1 (listed in
GATEWAY_FORWARDED_ALLOW_IPS) and sends the Host, X-Forwarded-Proto and X-Forwarded-For
headers nginx would.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from http.cookies import SimpleCookie

import httpx
import pytest

from tests import harness as live
from tests.conftest import MODEL, Live

pytestmark = pytest.mark.live

PASSWORD = "plover-tangent-quarry-41"
BEHIND_PROXY = {
    "GATEWAY_FORWARDED_ALLOW_IPS": "127.0.0.1",
    "ALLOWED_HOSTS": "gw.example",
    "GATEWAY_HTTPS": "true",
}


class Browser:
    """A browser behind the proxy: keeps its cookies itself (they are Secure, the hop is plain HTTP)."""

    def __init__(self, url: str, client_ip: str) -> None:
        self.http = httpx.Client(
            base_url=url,
            headers={"Host": "gw.example", "X-Forwarded-Proto": "https", "X-Forwarded-For": client_ip},
            timeout=30,
        )
        self.cookies: dict[str, str] = {}
        self.set_cookies: list[str] = []

    def request(
        self, method: str, path: str, data: dict[str, str] | None = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        headers = dict(headers or {})
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        response = self.http.request(method, path, data=data, headers=headers)
        for header in response.headers.get_list("set-cookie"):
            self.set_cookies.append(header)
            for name, morsel in SimpleCookie(header).items():
                self.cookies[name] = morsel.value
        return response

    def login(self, username: str, password: str) -> httpx.Response:
        page = self.request("GET", "/admin/login/")
        assert page.status_code == 200
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert token is not None
        return self.request(
            "POST",
            "/admin/login/?next=/admin/",
            data={"username": username, "password": password, "csrfmiddlewaretoken": token.group(1)},
            headers={"Origin": "https://gw.example", "Referer": "https://gw.example/admin/login/"},
        )


@pytest.fixture
def proxied(live_gw: Live, start_gateway: Callable[..., live.LiveProcess]) -> live.LiveProcess:
    from django.contrib.auth.models import User

    User.objects.create_superuser("root", "root@example.com", PASSWORD)
    return start_gateway(**BEHIND_PROXY)


def test_admin_login_behind_a_tls_proxy(proxied: live.LiveProcess) -> None:
    browser = Browser(proxied.url, "198.51.100.7")
    done = browser.login("root", PASSWORD)
    assert done.status_code == 302, done.text[:500]
    assert done.headers["location"] == "/admin/"
    assert done.headers["strict-transport-security"].startswith("max-age=")
    cookies = [header for header in browser.set_cookies if header.startswith(("csrftoken=", "sessionid="))]
    assert {header.split("=")[0] for header in cookies} == {"csrftoken", "sessionid"}
    assert all("; secure" in header.lower() for header in cookies), cookies
    home = browser.request("GET", "/admin/")
    assert home.status_code == 200
    assert "Site administration" in home.text


def test_admin_static_files_are_served(proxied: live.LiveProcess) -> None:
    browser = Browser(proxied.url, "198.51.100.7")
    page = browser.request("GET", "/admin/login/")
    stylesheets = re.findall(r'href="(/static/[^"]+\.css)"', page.text)
    assert stylesheets
    for path in stylesheets:
        sheet = browser.request("GET", path)
        assert sheet.status_code == 200, path
        assert sheet.headers["content-type"].startswith("text/css")
        assert sheet.content.strip()


def test_lockout_is_per_client_address_not_the_proxy(proxied: live.LiveProcess) -> None:
    attacker = Browser(proxied.url, "203.0.113.66")
    statuses = [attacker.login(f"guess{i}", "wrong-password").status_code for i in range(6)]
    assert statuses == [200, 200, 200, 200, 429, 429]
    # The administrator comes through the same proxy from another address: not locked out.
    assert Browser(proxied.url, "198.51.100.7").login("root", PASSWORD).status_code == 302


def test_forwarded_client_address_reaches_the_ip_policy(
    live_gw: Live, start_gateway: Callable[..., live.LiveProcess]
) -> None:
    _, key = live_gw.new_key(allowed_ips=["198.51.100.0/24"])
    body = {"model": MODEL, "input": "hi"}
    proxied = start_gateway(GATEWAY_FORWARDED_ALLOW_IPS="127.0.0.1")
    direct = start_gateway()  # trusts no proxy: the header is the client's own claim
    headers = {"Authorization": f"Bearer {key}", "X-Forwarded-For": "198.51.100.7"}
    with httpx.Client(timeout=30) as client:
        assert client.post(proxied.url + "/v1/responses", json=body, headers=headers).status_code == 200
        outside = {**headers, "X-Forwarded-For": "203.0.113.66"}
        assert client.post(proxied.url + "/v1/responses", json=body, headers=outside).status_code == 403
        assert client.post(direct.url + "/v1/responses", json=body, headers=headers).status_code == 403
