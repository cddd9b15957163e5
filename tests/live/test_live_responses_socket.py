"""``/v1/responses`` over a WebSocket, against a live gateway and the fake upstream.

A real WebSocket client (the ``websockets`` library) over a real socket: sequential responses
on one connection, continuation with ``previous_response_id``, ``previous_response_not_found``,
the key checked at the upgrade, errors as ``error`` events that leave the connection open, a
client that leaves mid-response, the key's concurrency limit, the idle and lifetime limits,
and compaction items passing through untouched (gateway/dataplane/socket.py).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from websockets.sync.connection import Connection

from tests.conftest import MODEL, Live

pytestmark = pytest.mark.live

TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


def ws_url(http_url: str) -> str:
    return "ws" + http_url.removeprefix("http") + "/v1/responses"


def open_socket(url: str, key: str) -> Connection:
    return connect(ws_url(url), additional_headers={"authorization": f"Bearer {key}"}, open_timeout=10, max_size=None)


def create(ws: Connection, **body: Any) -> list[dict[str, Any]]:
    """Send one ``response.create`` and read its events up to the terminal one."""
    ws.send(json.dumps({"type": "response.create", "model": MODEL, "store": False, **body}))
    return read_response(ws)


def read_response(ws: Connection, timeout: float = 15.0) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while True:
        event = json.loads(ws.recv(timeout=timeout))
        events.append(event)
        # An error event with a status is the gateway's answer to a refused response; one
        # without is the upstream's mid-stream error, followed by response.failed.
        if event["type"] in TERMINAL or (event["type"] == "error" and "status" in event):
            return events


def record_of(response_id: str, timeout: float = 10.0) -> Any:
    from tenancy.models import UsageRecord

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = UsageRecord.objects.filter(response_id=response_id).first()
        if record is not None:
            return record
        time.sleep(0.02)
    raise AssertionError(f"no usage record for {response_id}")


@pytest.fixture
def socket(live_gw: Live) -> Iterator[Connection]:
    with open_socket(live_gw.url, live_gw.owner.key) as ws:
        yield ws


def test_sequential_responses_on_one_connection_stream_like_sse_and_are_metered(
    live_gw: Live, socket: Connection
) -> None:
    first = create(socket, input="first question")
    second = create(socket, input="second question", stream=False)  # a socket always streams
    for events in (first, second):
        types = [event["type"] for event in events]
        assert types[0] == "response.created"
        assert types[-1] == "response.completed"
        assert "response.output_text.delta" in types
        assert [event["sequence_number"] for event in events] == list(range(len(events)))
    first_id, second_id = first[-1]["response"]["id"], second[-1]["response"]["id"]
    assert first_id != second_id
    # The same events an SSE client gets: the text of the deltas is the final text.
    deltas = "".join(event["delta"] for event in first if event["type"] == "response.output_text.delta")
    assert deltas == first[-1]["response"]["output"][0]["content"][0]["text"]
    for response_id, events in ((first_id, first), (second_id, second)):
        record = record_of(response_id)
        assert record.api_key_id == live_gw.owner.api_key.id
        assert record.stream is True
        assert record.status_code == 200
        assert record.total_tokens == events[-1]["response"]["usage"]["total_tokens"]


def test_continuation_sends_the_upstream_the_whole_context(live_gw: Live, socket: Connection) -> None:
    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}]
    first = create(socket, input="call the tool", tools=tools)
    call = first[-1]["response"]["output"][-1]
    assert call["type"] == "function_call"
    sent_first = live_gw.upstream.last_request()["body"]["input"]
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "42"}
    second = create(socket, input=[output], tools=tools, previous_response_id=first[-1]["response"]["id"])
    assert second[-1]["type"] == "response.completed"
    upstream = live_gw.upstream.last_request()["body"]
    assert "previous_response_id" not in upstream
    assert upstream["store"] is False
    # The first request's input, the first response's output, then the new input.
    assert upstream["input"][: len(sent_first)] == sent_first
    assert upstream["input"][len(sent_first)]["call_id"] == call["call_id"]
    assert upstream["input"][len(sent_first)]["type"] == "function_call"
    assert upstream["input"][-1] == output
    assert "The tool said: 42" in second[-1]["response"]["output"][0]["content"][0]["text"]
    # And a chain: the third turn continues from the second (which holds the first).
    third = create(socket, input="thanks", previous_response_id=second[-1]["response"]["id"])
    assert third[-1]["type"] == "response.completed"
    assert len(live_gw.upstream.last_request()["body"]["input"]) == len(upstream["input"]) + 2


@pytest.mark.parametrize("case", ["unknown", "another_connection", "store_true"])
def test_other_previous_response_ids_are_not_found_and_the_socket_survives(live_gw: Live, case: str) -> None:
    with open_socket(live_gw.url, live_gw.owner.key) as other:
        elsewhere = create(other, input="on another connection")[-1]["response"]["id"]
    with open_socket(live_gw.url, live_gw.owner.key) as ws:
        here = create(ws, input="here")[-1]["response"]["id"]
        previous, store = {
            "unknown": ("resp_nope", False),
            "another_connection": (elsewhere, False),
            "store_true": (here, True),
        }[case]
        before = live_gw.upstream.stats()["requests"]
        [error] = create(ws, input="next", previous_response_id=previous, store=store)
        assert error["type"] == "error"
        assert error["status"] == 404
        assert error["error"]["code"] == "previous_response_not_found"
        assert error["error"]["param"] == "previous_response_id"
        assert live_gw.upstream.stats()["requests"] == before  # nothing went upstream
        assert create(ws, input="still open")[-1]["type"] == "response.completed"


def test_over_http_previous_response_id_is_still_refused(live_gw: Live) -> None:
    response = live_gw.post({"model": MODEL, "input": "x", "previous_response_id": "resp_1"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "previous_response_id"


@pytest.mark.parametrize("key", ["sk-gw-not-a-key", ""])
def test_an_unknown_key_never_gets_a_socket(live_gw: Live, key: str) -> None:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(live_gw.url), additional_headers=headers, open_timeout=10)
    assert refused.value.response.status_code == 401
    body = json.loads(refused.value.response.body)
    assert body["error"]["code"] == "invalid_api_key"
    assert "sk-gw-not-a-key" not in refused.value.response.body.decode()


def test_errors_are_error_events_and_the_connection_survives(live_gw: Live, socket: Connection) -> None:
    socket.send(json.dumps({"type": "response.create", "input": "no model"}))
    [missing] = read_response(socket)
    assert (missing["type"], missing["status"], missing["error"]["param"]) == ("error", 400, "model")
    socket.send("{not json")
    [bad_json] = read_response(socket)
    assert bad_json["error"]["code"] == "invalid_json"
    socket.send(json.dumps({"type": "response.cancel"}))
    [unknown] = read_response(socket)
    assert (unknown["status"], unknown["error"]["code"]) == (400, "unknown_message_type")
    [not_served] = create(socket, model="no-such-model", input="x")
    assert not_served["status"] == 404
    # The Codex CLI's acknowledgement is accepted silently: the next message answered is the response.
    socket.send(json.dumps({"type": "response.processed", "response_id": "resp_x"}))
    assert create(socket, input="fine")[-1]["type"] == "response.completed"


def test_an_upstream_failure_mid_stream_ends_that_response_only(live_gw: Live, socket: Connection) -> None:
    events = create(socket, input="fail midway", metadata={"fake_fail_after": "8"})
    types = [event["type"] for event in events]
    assert types[0] == "response.created"
    assert "response.output_text.delta" in types
    assert types[-2:] == ["error", "response.failed"]
    assert create(socket, input="next one")[-1]["type"] == "response.completed"


def test_a_client_that_leaves_cancels_its_response_and_is_metered(live_gw: Live) -> None:
    from tenancy.models import UsageRecord

    ws = open_socket(live_gw.url, live_gw.owner.key)
    ws.send(
        json.dumps(
            {
                "type": "response.create",
                "model": MODEL,
                "input": "a slow one",
                "metadata": {"fake_tokens": "200", "fake_event_delay_ms": "50"},
            }
        )
    )
    created = json.loads(ws.recv(timeout=15))
    while json.loads(ws.recv(timeout=15))["type"] != "response.output_text.delta":
        pass
    ws.close()
    response_id = created["response"]["id"]
    deadline = time.monotonic() + 10
    record = None
    while time.monotonic() < deadline and record is None:
        record = UsageRecord.objects.filter(api_key_id=live_gw.owner.api_key.id, outcome="client_disconnected").first()
        time.sleep(0.05)
    assert record is not None, "the disconnected response was not metered"
    assert record.stream is True
    assert response_id  # the upstream had started answering when the client left


def test_the_keys_concurrency_limit_counts_socket_responses(live_gw: Live) -> None:
    _, key = live_gw.new_key(concurrency=1)
    with open_socket(live_gw.url, key) as ws:
        ws.send(
            json.dumps(
                {
                    "type": "response.create",
                    "model": MODEL,
                    "input": "hold the slot",
                    "metadata": {"fake_tokens": "40", "fake_event_delay_ms": "50"},
                }
            )
        )
        assert json.loads(ws.recv(timeout=15))["type"] == "response.created"
        refused = live_gw.post({"model": MODEL, "input": "meanwhile"}, key=key)
        assert refused.status_code == 429
        assert refused.json()["error"]["param"] == "key.concurrency"
        assert read_response(ws)[-1]["type"] == "response.completed"
    assert live_gw.post({"model": MODEL, "input": "after"}, key=key).status_code == 200


def test_idle_and_lifetime_limits_close_with_a_reason(live_gw: Live, start_gateway: Any) -> None:
    # Each limit on a gateway of its own, the other one out of reach: on a loaded machine a busy
    # client's pause can be long, and must not be taken for idleness.
    idling = start_gateway(GATEWAY_WS_IDLE_SECONDS="1", GATEWAY_WS_MAX_SECONDS="3600")
    ageing = start_gateway(GATEWAY_WS_IDLE_SECONDS="600", GATEWAY_WS_MAX_SECONDS="3")
    silent = open_socket(idling.url, live_gw.owner.key)
    busy = open_socket(ageing.url, live_gw.owner.key)
    results: dict[str, Any] = {}

    def keep_busy() -> None:
        # Every event is kept as it arrives, so the limit's error event is seen whichever
        # request it interrupts (or answers).
        events: list[dict[str, Any]] = []
        try:
            while True:
                busy.send(
                    json.dumps({"type": "response.create", "model": MODEL, "store": False, "input": "still here"})
                )
                while True:
                    events.append(json.loads(busy.recv(timeout=15)))
                    last = events[-1]
                    if last["type"] in TERMINAL or (last["type"] == "error" and "status" in last):
                        break
                time.sleep(0.1)
        except ConnectionClosed:
            pass
        try:  # what arrived before the close (a send after it raises at once)
            while True:
                events.append(json.loads(busy.recv(timeout=5)))
        except ConnectionClosed as closed:
            results["busy"] = (events, closed.rcvd)

    thread = threading.Thread(target=keep_busy)
    thread.start()
    with pytest.raises(ConnectionClosed) as idle:
        silent.recv(timeout=15)
    assert idle.value.rcvd is not None
    assert (idle.value.rcvd.code, idle.value.rcvd.reason) == (1000, "idle timeout")
    thread.join(30)
    events, close = results["busy"]
    assert close is not None
    assert (close.code, close.reason) == (1000, "connection lifetime reached"), events[-3:]
    limit = [event for event in events if event["type"] == "error"]
    assert limit, [event["type"] for event in events]
    assert limit[-1]["error"]["code"] == "websocket_connection_limit_reached"
    assert sum(event["type"] == "response.completed" for event in events) >= 2


def test_compaction_items_pass_through_untouched(live_gw: Live, socket: Connection) -> None:
    compaction = {"type": "compaction", "id": "cmp_1", "encrypted_content": "c2VhbGVk+/="}
    items = [{"role": "user", "content": "hello"}, compaction, {"type": "compaction_trigger"}]
    events = create(socket, input=items)
    [item] = events[-1]["response"]["output"]
    assert item["type"] == "compaction"
    assert item["encrypted_content"]
    sent = live_gw.upstream.last_request()["body"]["input"]
    assert sent[1:] == [compaction, {"type": "compaction_trigger"}]
    # Over HTTP too, and the compaction item the upstream made goes back unchanged.
    response = live_gw.post({"model": MODEL, "input": [{"role": "user", "content": "go on"}, item]})
    assert response.status_code == 200
    assert live_gw.upstream.last_request()["body"]["input"][-1] == item
