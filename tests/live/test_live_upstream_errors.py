"""Upstream error answers through a live gateway (issue 10, items 12 and 13).

An upstream's 4xx reaches the client only as the OpenAI envelope, whatever the upstream sent
(HTML, nothing, its own envelope with extra fields, the request's headers echoed back), and
never with the account's credential; a 3xx is the account failing (502 ``upstream_error`` when
no other account serves), never relayed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from gateway.devtools.fake_upstream.wire import JSON_TYPE, head
from tests.harness import assert_error
from tests.live.test_live_pools import (
    Pools,
    body,
    pools_fixture,  # noqa: F401 - the fixture `pools`
)

CREDENTIAL = "sk-upstream-credential-for-echo-0123456789"


def answer(status: int, content: bytes, content_type: bytes = JSON_TYPE, extra: bytes = b"") -> list[bytes]:
    return [head(status, content_type, len(content), extra) + content]


def echo_headers(request: Any) -> list[bytes]:
    """An upstream that echoes the request's headers in its 400 envelope (as some proxies do)."""
    seen = "; ".join(f"{name.decode()}: {value.decode()}" for name, value in request.headers)
    error = {"error": {"message": f"Bad request. Headers: {seen}", "type": "invalid_request_error", "code": None}}
    return answer(400, orjson.dumps(error))


SCRIPTS: dict[str, Callable[[Any], list[bytes]]] = {
    "html": lambda _: answer(400, b"<html><body><h1>400 Bad Request</h1>nginx</body></html>", b"text/html"),
    "html as json": lambda _: answer(404, b"<html><body>Not Found</body></html>"),
    "empty": lambda _: answer(422, b""),
    "list": lambda _: answer(400, b"[1,2,3]"),
}


@pytest.mark.parametrize(("name", "status"), [("html", 400), ("html as json", 404), ("empty", 422), ("list", 400)])
@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_4xx_that_is_not_an_envelope_reaches_the_client_as_one(
    pools: Pools, name: str, status: int, stream: bool
) -> None:
    upstream = pools.fake()
    upstream.script = SCRIPTS[name]
    pools.account(upstream)
    response = pools.post(body(stream=stream))
    assert response.headers["content-type"] == "application/json"
    assert_error(response, status, "upstream_rejected", type="invalid_request_error")
    assert response.json()["error"]["message"] == f"The upstream rejected the request (HTTP {status})."
    record = pools.record(response)
    assert (record.status_code, record.outcome) == (status, "upstream_rejected")


def test_an_upstream_envelope_keeps_its_fields_without_the_credential(pools: Pools) -> None:
    upstream = pools.fake()
    upstream.script = echo_headers
    pools.account(upstream, api_key=CREDENTIAL)
    response = pools.post(body())
    # The upstream did receive the credential, and echoed it.
    [received] = [r for r in upstream.requests() if r["method"] == "POST"]
    assert CREDENTIAL in str(received["headers"])
    assert CREDENTIAL not in response.text
    assert_error(response, 400, None, type="invalid_request_error")
    message = response.json()["error"]["message"]
    assert message.startswith("Bad request. Headers: ")
    assert "Bearer [redacted]" in message


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_an_upstream_redirect_is_a_failed_attempt_never_relayed(pools: Pools, status: int) -> None:
    moved = pools.fake()
    moved.script = lambda _: answer(status, b"", extra=b"location: https://elsewhere.example/v1/responses\r\n")
    bad = pools.account(moved, priority=0)
    pools.strategy("fill_first")
    # The only account: a 502 upstream_error, recorded as such.
    response = pools.post(body())
    assert_error(response, 502, "upstream_error", type="server_error")
    assert "location" not in response.headers
    record = pools.record(response)
    assert (record.status_code, record.outcome) == (502, "upstream_error")
    assert [(a["account_id"], a["outcome"], a["status"]) for a in record.attempts] == [
        (bad.pk, "upstream_error", status)
    ]
    # With a healthy account behind it, the client never notices.
    good = pools.account(pools.fake(), priority=1)
    record = pools.record(pools.served(body()))
    assert record.account_id == good.pk
