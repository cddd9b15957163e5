"""The console's live view over a real socket: a signed-in operator's browser session opens
``/console/live/ws/`` on a running gateway and sees a request sent with a key appear."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import MODEL, Live

pytestmark = pytest.mark.live
PASSWORD = "a-long-enough-password-42"


def session_cookie(url: str, username: str) -> str:
    """Sign in through the console's login form; the Cookie header of the session."""
    with httpx.Client(base_url=url, timeout=10) as client:
        form = client.get("/console/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
        assert token is not None
        signed = client.post(
            "/console/login/",
            data={"username": username, "password": PASSWORD, "csrfmiddlewaretoken": token.group(1)},
            headers={"referer": url + "/console/login/"},
        )
        assert signed.status_code == 302, signed.text[:500]
        return "; ".join(f"{name}={value}" for name, value in client.cookies.items())


def test_a_request_appears_in_the_live_view(live_gw: Live) -> None:
    from django.contrib.auth.models import User

    User.objects.create_user("olga", password=PASSWORD, is_staff=True)
    cookie = session_cookie(live_gw.url, "olga")
    ws_url = "ws" + live_gw.url.removeprefix("http") + "/console/live/ws/"
    with connect(ws_url, additional_headers={"cookie": cookie, "origin": live_gw.url}, open_timeout=10) as ws:
        sent: set[str] = set()
        deadline = time.monotonic() + 15
        seen: dict[str, dict[str, object]] = {}
        while time.monotonic() < deadline and not sent & set(seen):
            # The feed learns of its watcher within a flush (0.25 s): send until a line shows.
            response = live_gw.post({"model": MODEL, "input": "live"})
            assert response.status_code == 200
            sent.add(response.headers["x-request-id"])
            try:
                while True:
                    for line in json.loads(ws.recv(timeout=1))["lines"]:
                        seen[line["request_id"]] = line
            except TimeoutError:
                pass
        [request_id, *_] = sorted(sent & set(seen))
        line = seen[request_id]
        assert line["key"] == live_gw.owner.api_key.prefix
        assert (line["model"], line["status"], line["outcome"]) == (MODEL, 200, "completed")
        assert isinstance(line["tokens"], int)
        assert line["tokens"] > 0


def test_the_live_socket_refuses_without_a_session_or_from_another_site(live_gw: Live) -> None:
    from django.contrib.auth.models import User

    User.objects.create_user("olga", password=PASSWORD, is_staff=True)
    ws_url = "ws" + live_gw.url.removeprefix("http") + "/console/live/ws/"
    cookie = session_cookie(live_gw.url, "olga")
    for headers in (
        {"origin": "https://evil.example", "cookie": cookie},  # another site, even with the session
        {"origin": live_gw.url},  # no session
    ):
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url, additional_headers=headers, open_timeout=10)
        assert refused.value.response.status_code == 403
