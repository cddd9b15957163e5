"""Upstream faults through a live gateway: what the client gets when the upstream fails."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests import harness as live
from tests.conftest import DATA_DIR, MODEL, OTHER_MODEL, Live
from tests.harness import assert_error

pytestmark = pytest.mark.live


def body(stream: bool = False, **metadata: str) -> dict[str, Any]:
    return {"model": MODEL, "input": "hi", "stream": stream, "metadata": metadata}


def assert_upstream_error(response: httpx.Response) -> None:
    """A plain JSON 502 (never SSE), type server_error, code upstream_error."""
    error = assert_error(response, 502, "upstream_error", type="server_error")
    assert "sk-upstream-secret" not in error["message"]
    assert "127.0.0.1" not in error["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_connect_error_is_502(live_gw: Live, stream: bool) -> None:
    closed_port = live.free_port()  # nothing listens there
    account = live_gw.add_account(["gpt-dead"], base_url=f"http://127.0.0.1:{closed_port}/v1")
    response = live_gw.post({**body(stream), "model": "gpt-dead"})
    assert_upstream_error(response)
    record = live_gw.wait_usage(response.headers["x-request-id"])
    assert (record.status_code, record.outcome, record.account_id) == (502, "upstream_error", account.id)
    assert record.input_tokens is None
    assert record.output_tokens is None


@pytest.mark.parametrize("status", [500, 502, 503])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_5xx_is_502_upstream_error(live_gw: Live, status: int, stream: bool) -> None:
    response = live_gw.post(body(stream, fake_status=str(status)))
    assert_upstream_error(response)
    assert live_gw.upstream.last_request()["body"]["metadata"]["fake_status"] == str(status)
    record = live_gw.wait_usage(response.headers["x-request-id"])
    assert (record.status_code, record.outcome, record.stream) == (502, "upstream_error", stream)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_400_is_relayed_with_its_envelope(live_gw: Live, stream: bool) -> None:
    response = live_gw.post(body(stream, fake_status="400", fake_error_code="context_length_exceeded"))
    error = assert_error(response, 400, "context_length_exceeded")
    assert error["message"] == "Fake upstream: injected bad request."
    record = live_gw.wait_usage(response.headers["x-request-id"])
    assert (record.status_code, record.outcome) == (400, "upstream_rejected")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_429_cools_the_account_and_answers_usage_limit_reached(live_gw: Live, stream: bool) -> None:
    # The only account answers 429: it cools down for the upstream's Retry-After, and the
    # client is told when to come back (issue 4: usage_limit_reached, not the raw 429).
    response = live_gw.post(body(stream, fake_status="429", fake_retry_after="7"))
    assert_error(response, 429, "usage_limit_reached", type="rate_limit_error")
    assert 6 <= int(response.headers["retry-after"]) <= 7
    record = live_gw.wait_usage(response.headers["x-request-id"])
    assert (record.status_code, record.outcome) == (429, "rate_limited")
    assert [(a["account_id"], a["outcome"], a["status"]) for a in record.attempts] == [
        (live_gw.account.pk, "rate_limited", 429)
    ]
    # While it cools down, nothing is sent to it.
    before = len(live_gw.upstream.requests())
    again = live_gw.post(body(stream))
    assert_error(again, 429, "usage_limit_reached", type="rate_limit_error")
    assert len(live_gw.upstream.requests()) == before


def test_sdk_sees_upstream_429_as_rate_limit_error(live_gw: Live) -> None:
    import openai

    client = live_gw.openai(max_retries=0, timeout=10)
    with pytest.raises(openai.InternalServerError) as server:
        client.responses.create(model=MODEL, input="hi", metadata={"fake_status": "503"})
    assert server.value.status_code == 502
    assert server.value.code == "upstream_error"
    with pytest.raises(openai.RateLimitError) as caught:
        client.responses.create(model=MODEL, input="hi", metadata={"fake_status": "429", "fake_retry_after": "1"})
    assert caught.value.response.headers["retry-after"] == "1"


def test_no_enabled_account_is_503(live_gw: Live) -> None:
    from accounts import services as account_services

    account_services.upstream_account_set_enabled(account=live_gw.account, enabled=False)
    before = live_gw.upstream.stats()["requests"]
    for model in (MODEL, OTHER_MODEL):
        assert_error(live_gw.post({**body(), "model": model}), 503, "no_accounts", type="server_error")
        assert_error(live_gw.post({**body(True), "model": model}), 503, "no_accounts", type="server_error")
    assert live_gw.upstream.stats()["requests"] == before
    with live_gw.http() as client:
        assert client.get("/v1/models").json()["data"] == []


def test_upstream_truncated_json_body_is_502(live_gw: Live) -> None:
    # The fake hangs up halfway through the JSON body it promised.
    assert_upstream_error(live_gw.post(body(fake_cut_after="1")))


@pytest.fixture(scope="module")
def quick_timeout_gateway(live_env: dict[str, str]) -> Iterator[str]:
    """A dedicated gateway whose upstream read timeout is short (shared by this module's tests)."""
    port = live.free_port()
    env = {**live_env, "GATEWAY_UPSTREAM_READ_TIMEOUT": "0.5"}
    with live.running(live.gateway(port, env, DATA_DIR / "gateway-quick-timeout.log")) as process:
        yield process.url


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_timeout_is_502(live_gw: Live, quick_timeout_gateway: str, stream: bool) -> None:
    with live_gw.http() as client:
        response = client.post(quick_timeout_gateway + "/v1/responses", json=body(stream, fake_hang="1"))
    assert_upstream_error(response)
    assert "in time" in response.json()["error"]["message"]
    record = live_gw.wait_usage(response.headers["x-request-id"])
    assert (record.status_code, record.outcome, record.stream) == (502, "upstream_error", stream)


def test_upstream_silent_before_output_past_the_timeout_is_a_plain_502(
    live_gw: Live, quick_timeout_gateway: str
) -> None:
    # The stream is held back until real output arrives (issue 4), so an upstream that
    # stalls before any output is a failed attempt, not a failed stream: the client gets
    # a plain 502 envelope and no SSE at all.
    with live_gw.http() as client:
        payload = body(True, fake_event_delay_ms="1500", fake_tokens="1")
        response = client.post(quick_timeout_gateway + "/v1/responses", json=payload)
    assert_error(response, 502, "upstream_error", type="server_error")
    record = live_gw.wait_usage(response.headers["x-request-id"])
    assert record.outcome == "upstream_error"
    assert [a["outcome"] for a in record.attempts] == ["upstream_error"]
