"""Misbehaving upstreams through a live gateway (issue 10, items 14, 15 and 16).

Every fault ends in a clear answer: before the first byte a failed attempt (the next account
is tried; with none left, 502 ``upstream_error``), after it an ``error`` event then
``response.failed``, and the record says ``upstream_error``. Nothing waits for ever: an
upstream that trickles or sends only keep-alive comments is cut at the deadlines
(``GATEWAY_UPSTREAM_TOTAL_TIMEOUT``, ``GATEWAY_UPSTREAM_IDLE_TIMEOUT``), and nothing grows
without bound (``GATEWAY_UPSTREAM_MAX_FRAME_BYTES``, ``GATEWAY_UPSTREAM_MAX_BODY_BYTES``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from gateway.devtools.fake_upstream.wire import JSON_TYPE, OK_HEADERS, SSE_TYPE, chunk, head, sse_frame
from tests import harness as live
from tests.harness import assert_error, sse_events
from tests.live.test_live_pools import (
    MODEL,
    Pools,
    body,
    pools_fixture,  # noqa: F401 - the fixture `pools`
)

LIMITS = {
    "GATEWAY_UPSTREAM_TOTAL_TIMEOUT": "4",
    "GATEWAY_UPSTREAM_IDLE_TIMEOUT": "1",
    "GATEWAY_UPSTREAM_MAX_FRAME_BYTES": str(64 * 1024),
    "GATEWAY_UPSTREAM_MAX_BODY_BYTES": str(64 * 1024),
}

RESPONSE: dict[str, Any] = {
    "id": "resp_fault",
    "object": "response",
    "created_at": 1700000000,
    "status": "in_progress",
    "model": MODEL,
    "output": [],
    "usage": None,
}
USAGE = {"input_tokens": 7, "output_tokens": 2, "total_tokens": 9}


def frames(*events: dict[str, Any]) -> list[bytes]:
    return [chunk(sse_frame({**event, "sequence_number": i})) for i, event in enumerate(events)]


CREATED = {"type": "response.created", "response": RESPONSE}
DELTA = {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "Hi"}
SSE_HEAD = head(200, SSE_TYPE, None, OK_HEADERS)


def json_answer(content: bytes, content_type: bytes = JSON_TYPE) -> list[Any]:
    return [head(200, content_type, len(content), OK_HEADERS) + content]


@pytest.fixture
def gateway(start_gateway: Callable[..., live.LiveProcess]) -> live.LiveProcess:
    return start_gateway(**LIMITS)


def stream(pools: Pools, gateway: live.LiveProcess) -> tuple[Any, list[dict[str, Any]]]:
    response = pools.post(body(stream=True), url=gateway.url)
    assert response.status_code == 200
    return pools.record(response), sse_events(response.content)


def assert_failed_stream(events: list[dict[str, Any]], code: str) -> None:
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["code"] == code
    assert events[-1]["response"]["status"] == "failed"
    numbers = [e["sequence_number"] for e in events]
    assert numbers == list(range(len(events)))


# --- item 14: deadlines -----------------------------------------------------------------------


def test_a_trickling_json_answer_is_cut_at_the_total_deadline(pools: Pools, gateway: live.LiveProcess) -> None:
    upstream = pools.fake()
    # A head, then one byte every 0.2 s, for ever.
    upstream.script = lambda _: [head(200, JSON_TYPE, None, OK_HEADERS), *([chunk(b" "), 0.2] * 100_000)]
    pools.account(upstream)
    response = pools.post(body(), url=gateway.url)
    assert_error(response, 502, "upstream_error", type="server_error")
    assert "took over 4s" in response.json()["error"]["message"]
    assert pools.record(response).outcome == "upstream_error"


@pytest.mark.parametrize("kind", ["comments", "trickle"])
def test_a_stream_that_stops_sending_events_fails_at_the_idle_deadline(
    pools: Pools, gateway: live.LiveProcess, kind: str
) -> None:
    upstream = pools.fake()
    tail = [chunk(b": keep-alive\n\n"), 0.2] if kind == "comments" else [chunk(b"d"), 0.1]
    upstream.script = lambda _: [SSE_HEAD, *frames(CREATED, DELTA), *(tail * 100_000)]
    pools.account(upstream)
    record, events = stream(pools, gateway)
    assert [e["type"] for e in events[:2]] == ["response.created", "response.output_text.delta"]
    assert_failed_stream(events, "upstream_timeout")
    assert "sent nothing for 1s" in events[-2]["message"]
    assert (record.status_code, record.outcome) == (200, "upstream_error")


# --- item 15: odd answers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"[1,2,3]", b"{}", b'{"id": "resp_1", "object": "list"}', b"not json"],
    ids=["list", "empty", "not-a-response", "garbage"],
)
def test_a_200_that_is_not_a_response_object_is_a_failed_attempt(pools: Pools, content: bytes) -> None:
    odd = pools.fake()
    odd.script = lambda _: json_answer(content)
    bad = pools.account(odd, priority=0)
    pools.strategy("fill_first")
    response = pools.post(body())
    assert_error(response, 502, "upstream_error", type="server_error")
    record = pools.record(response)
    assert [(a["account_id"], a["status"]) for a in record.attempts] == [(bad.pk, 502)]
    good = pools.account(pools.fake(), priority=1)
    assert pools.record(pools.served(body())).account_id == good.pk


def test_a_json_answer_to_a_stream_request_is_a_failed_attempt(pools: Pools) -> None:
    odd = pools.fake()
    odd.script = lambda _: json_answer(orjson.dumps({**RESPONSE, "status": "completed", "usage": USAGE}))
    pools.account(odd)
    response = pools.post(body(stream=True))
    assert_error(response, 502, "upstream_error", type="server_error")
    assert "a JSON answer to this request" in response.json()["error"]["message"]


def test_a_malformed_terminal_event_fails_the_stream_cleanly(pools: Pools) -> None:
    upstream = pools.fake()
    garbage = chunk(b"event: response.completed\ndata: {not json\n\n")
    # (The pause: the output commits the stream before the bad event arrives.)
    upstream.script = lambda _: [SSE_HEAD, *frames(CREATED, DELTA), 0.1, garbage, b"0\r\n\r\n"]
    pools.account(upstream)
    response = pools.post(body(stream=True))
    assert response.status_code == 200
    events = sse_events(response.content)
    assert [e["type"] for e in events[:2]] == ["response.created", "response.output_text.delta"]
    assert_failed_stream(events, "upstream_error")
    assert "malformed response.completed" in events[-2]["message"]
    assert pools.record(response).outcome == "upstream_error"


def test_a_malformed_terminal_event_before_any_output_is_retried_invisibly(pools: Pools) -> None:
    odd = pools.fake()
    garbage = chunk(b'event: response.completed\ndata: {"type": "response.completed", "response": 3}\n\n')
    odd.script = lambda _: [SSE_HEAD, *frames(CREATED), garbage, b"0\r\n\r\n"]
    bad = pools.account(odd, priority=0)
    good = pools.account(pools.fake(), priority=1)
    pools.strategy("fill_first")
    response = pools.served(body(stream=True))
    assert sse_events(response.content)[-1]["type"] == "response.completed"
    record = pools.record(response)
    assert record.account_id == good.pk
    assert [a["account_id"] for a in record.attempts] == [bad.pk]


# --- item 16: sizes ---------------------------------------------------------------------------


def test_an_sse_frame_over_the_cap_fails_the_stream(pools: Pools, gateway: live.LiveProcess) -> None:
    upstream = pools.fake()
    endless = [chunk(b"data: " + b"x" * 16384) for _ in range(16)]  # 256 KiB, no frame end
    upstream.script = lambda _: [SSE_HEAD, *frames(CREATED, DELTA), 0.1, *endless, 5.0]
    pools.account(upstream)
    record, events = stream(pools, gateway)
    assert_failed_stream(events, "upstream_error")
    assert "over 65536 bytes" in events[-2]["message"]
    assert record.outcome == "upstream_error"


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_json_body_over_the_cap_is_a_failed_attempt(pools: Pools, gateway: live.LiveProcess, declared: bool) -> None:
    upstream = pools.fake()
    big = orjson.dumps({**RESPONSE, "status": "completed", "instructions": "x" * 200_000})
    if declared:
        upstream.script = lambda _: json_answer(big)
    else:
        upstream.script = lambda _: [head(200, JSON_TYPE, None, OK_HEADERS), chunk(big), b"0\r\n\r\n"]
    pools.account(upstream)
    response = pools.post(body(), url=gateway.url)
    assert_error(response, 502, "upstream_error", type="server_error")
    assert "over 65536 bytes" in response.json()["error"]["message"]
