"""The fake upstream over real sockets: wire shapes, the official SDKs, fault knobs, HTTP details.

The server runs as the benchmark runs it (``python -m gateway.devtools.fake_upstream.server``) in a subprocess, on a
port it picks itself and announces on its ready line. No database is needed:
``pytest tests/test_fake_upstream.py -p no:django``.
"""

from __future__ import annotations

import json
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"fake upstream listening on http://([\d.]+):(\d+)")
ID_SUFFIX = r"[0-9a-f]{28}"


class Upstream:
    """A fake upstream subprocess and helpers to talk to it."""

    def __init__(self, *flags: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.devtools.fake_upstream", "--port", "0", *flags],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.ready_line = self._read_ready_line(timeout=15)
        match = READY.fullmatch(self.ready_line)
        assert match, self.ready_line
        self.port = int(match.group(2))
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def _read_ready_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            raise AssertionError("fake upstream did not print its ready line")
        return self.proc.stdout.readline().strip()

    def sdk(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="sk-test", max_retries=0, **kwargs)

    def stats(self) -> dict[str, Any]:
        return self.http.get("/_fake/stats").json()

    def stop(self) -> int:
        """SIGTERM the server; return its exit status after checking it logged no traceback."""
        self.http.close()
        self.proc.send_signal(signal.SIGTERM)
        _, stderr = self.proc.communicate(timeout=10)
        assert "Traceback" not in stderr, stderr
        return self.proc.returncode


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream("--tokens", "16")
    yield server
    assert server.stop() == 0, "SIGTERM must end the server cleanly"


@pytest.fixture
def fresh(upstream: Upstream) -> Upstream:
    """The shared server with stats, history and prompt-cache memory cleared."""
    assert upstream.http.post("/_fake/reset").json() == {"reset": True}
    return upstream


@pytest.fixture
def client(upstream: Upstream) -> openai.OpenAI:
    return upstream.sdk()


def sse_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse an SSE body strictly as ``event: T\\ndata: JSON\\n\\n`` frames."""
    assert raw.endswith("\n\n")
    events = []
    for frame in raw[:-2].split("\n\n"):
        event_line, data_line = frame.split("\n")
        assert event_line.startswith("event: ")
        assert data_line.startswith("data: ")
        data = json.loads(data_line[len("data: ") :])
        assert data["type"] == event_line[len("event: ") :]
        events.append((data["type"], data))
    return events


def post_stream(upstream: Upstream, body: dict[str, Any], **headers: str) -> list[tuple[str, dict[str, Any]]]:
    response = upstream.http.post("/v1/responses", json={**body, "stream": True}, headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["transfer-encoding"] == "chunked"
    return sse_events(response.text)


FUNCTION_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "minimum": 1},
            "metric": {"type": "boolean"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "days", "unit"],
        "additionalProperties": False,
    },
    "strict": True,
}


# --- process and plain HTTP -----------------------------------------------------------------------


def test_module_does_not_import_django() -> None:
    """The fake imports no Django module of its own (the ``gateway`` package's ``__init__`` is not ours)."""
    code = (
        "import sys, gateway\n"
        "before = {m for m in sys.modules if m.startswith('django')}\n"
        "import gateway.devtools.fake_upstream.server\n"
        "added = {m for m in sys.modules if m.startswith('django')} - before\n"
        "assert not added, added\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_ready_line_health_models_and_404(upstream: Upstream) -> None:
    assert upstream.ready_line == f"fake upstream listening on http://127.0.0.1:{upstream.port}"
    assert upstream.http.get("/health").status_code == 200
    models = upstream.http.get("/v1/models").json()
    assert models["object"] == "list"
    assert {"id", "object", "created", "owned_by"} <= set(models["data"][0])
    assert upstream.http.get("/models").json() == models
    missing = upstream.http.get("/v1/nope")
    assert missing.status_code == 404
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_bad_json_and_missing_model_are_400_envelopes(upstream: Upstream) -> None:
    bad = upstream.http.post("/v1/responses", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    assert set(bad.json()["error"]) == {"message", "type", "param", "code"}
    no_model = upstream.http.post("/v1/responses", json={"input": "hi"})
    assert no_model.status_code == 400
    assert no_model.json()["error"]["param"] == "model"


def test_json_response_shape(fresh: Upstream) -> None:
    body = {"model": "gpt-4.1", "input": "hello there, fake upstream", "instructions": "be brief", "temperature": 0.2}
    response = fresh.http.post("/v1/responses", json=body)
    assert response.status_code == 200
    assert response.headers["x-request-id"].startswith("req_")
    assert int(response.headers["content-length"]) == len(response.content)
    data = response.json()
    assert re.fullmatch("resp_" + ID_SUFFIX, data["id"])
    assert data["object"] == "response"
    assert data["status"] == "completed"
    assert isinstance(data["created_at"], int)
    assert isinstance(data["completed_at"], int)
    assert data["error"] is None
    assert data["incomplete_details"] is None
    assert data["model"] == "gpt-4.1"
    assert data["instructions"] == "be brief"
    assert data["temperature"] == 0.2
    assert data["tool_choice"] == "auto"
    assert data["parallel_tool_calls"] is True
    assert data["tools"] == []
    assert data["metadata"] == {}
    [message] = data["output"]
    assert re.fullmatch("msg_" + ID_SUFFIX, message["id"])
    assert message["type"] == "message"
    assert message["role"] == "assistant"
    assert message["status"] == "completed"
    [part] = message["content"]
    assert part["type"] == "output_text"
    assert part["annotations"] == []
    assert len(part["text"].split(" ")) == 16  # --tokens 16
    usage = data["usage"]
    assert usage == {
        "input_tokens": usage["input_tokens"],
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 16,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["input_tokens"] + 16,
    }
    assert usage["input_tokens"] == (len(b"hello there, fake upstream") + len(b"be brief")) // 4


def test_path_without_v1_prefix_and_chunked_request_body(upstream: Upstream) -> None:
    payload = json.dumps({"model": "m", "input": "chunked please"}).encode()
    response = upstream.http.post(
        "/responses", content=iter([payload[:10], payload[10:]]), headers={"content-type": "application/json"}
    )
    assert response.status_code == 200
    assert response.json()["model"] == "m"


def test_keep_alive_and_pipelining_on_one_connection(upstream: Upstream) -> None:
    body = b'{"model":"gpt-4.1","input":"hi"}'
    request = (
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with socket.create_connection(("127.0.0.1", upstream.port), timeout=5) as sock:
        reader = sock.makefile("rb")
        sock.sendall(request)
        first = read_http_response(reader)
        sock.sendall(request + request)  # the same connection again, then two pipelined requests
        second, third = read_http_response(reader), read_http_response(reader)
    ids = {json.loads(r)["id"] for r in (first, second, third)}
    assert len(ids) == 3


def read_http_response(reader: Any) -> bytes:
    status = reader.readline()
    assert status.startswith(b"HTTP/1.1 200"), status
    length = None
    while (line := reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
        assert name.lower() != "connection" or "close" not in value
    assert length is not None
    return reader.read(length)


def test_repeated_identical_requests_get_fresh_ids(upstream: Upstream) -> None:
    """Identical bodies are served from a cache after the second sight: ids must still be unique."""
    body = {"model": "gpt-4.1", "input": "same body every time"}
    answers = [upstream.http.post("/v1/responses", json=body).json() for _ in range(4)]
    assert len({a["id"] for a in answers}) == 4
    assert len({a["output"][0]["id"] for a in answers}) == 4
    assert len({a["output"][0]["content"][0]["text"] for a in answers}) == 1
    streams = [post_stream(upstream, body) for _ in range(4)]
    assert len({events[0][1]["response"]["id"] for events in streams}) == 4
    for events in streams:
        assert [e["sequence_number"] for _, e in events] == list(range(len(events)))


# --- streaming ------------------------------------------------------------------------------------


def test_stream_event_order_and_sequence_numbers(upstream: Upstream) -> None:
    events = post_stream(upstream, {"model": "gpt-4.1", "input": "stream me"}, **{"x-fake-tokens": "20"})
    types = [t for t, _ in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 20,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for _, e in events] == list(range(28))
    created, completed = events[0][1]["response"], events[-1][1]["response"]
    assert created["status"] == "in_progress"
    assert created["output"] == []
    assert created["usage"] is None
    assert {e["response"]["id"] for t, e in events if "response" in e} == {created["id"]}
    item_id = events[2][1]["item"]["id"]
    deltas = [e for t, e in events if t == "response.output_text.delta"]
    assert all(d["item_id"] == item_id and d["logprobs"] == [] for d in deltas)
    text = "".join(d["delta"] for d in deltas)
    assert events[-4][1]["text"] == text
    assert completed["output"][0]["content"][0]["text"] == text
    assert completed["usage"]["output_tokens"] == 20


def test_sdk_stream_final_response_matches_deltas(client: openai.OpenAI) -> None:
    with client.responses.stream(model="gpt-4.1", input="hi", metadata={"fake_tokens": "20"}) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert len(deltas) == 20
    assert final.output_text == "".join(deltas)
    assert final.usage is not None
    assert final.usage.output_tokens == 20
    assert final.usage.input_tokens_details.cache_write_tokens == 0


def test_sdk_create_non_streaming(client: openai.OpenAI) -> None:
    response = client.responses.create(model="gpt-4.1", input=[{"role": "user", "content": "hello"}])
    assert response.status == "completed"
    assert len(response.output_text.split(" ")) == 16
    assert response.usage is not None
    assert response.usage.total_tokens == response.usage.input_tokens + 16


def test_event_delay_spreads_the_stream_over_time(upstream: Upstream) -> None:
    arrivals = []
    started = time.monotonic()
    body = {
        "model": "m",
        "input": "slow",
        "stream": True,
        "metadata": {"fake_tokens": "2", "fake_event_delay_ms": "40"},
    }
    with upstream.http.stream("POST", "/v1/responses", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 10
    assert arrivals[-1] - arrivals[0] >= 9 * 0.04 * 0.9  # frames were flushed one by one, 40 ms apart


# --- tools, structured output, reasoning, caching ------------------------------------------------


def test_function_call_round_trip_with_sdk(client: openai.OpenAI) -> None:
    first = client.responses.create(model="gpt-4.1", input="weather in Paris?", tools=[FUNCTION_TOOL])
    [call] = first.output
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert re.fullmatch("fc_" + ID_SUFFIX, call.id or "")
    assert re.fullmatch("call_" + ID_SUFFIX, call.call_id)
    arguments = json.loads(call.arguments)
    assert set(FUNCTION_TOOL["parameters"]["required"]) <= set(arguments)
    assert isinstance(arguments["city"], str)
    assert arguments["days"] >= 1
    assert arguments["unit"] == "celsius"

    replay: Any = [
        {"role": "user", "content": "weather in Paris?"},
        call.model_dump(exclude_none=True),  # clients send output items back verbatim
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"},
    ]
    second = client.responses.create(model="gpt-4.1", tools=[FUNCTION_TOOL], input=replay)
    assert second.output[0].type == "message"
    assert second.output_text == "The tool said: sunny, 21C"


def test_function_call_stream_events(upstream: Upstream, client: openai.OpenAI) -> None:
    events = post_stream(upstream, {"model": "m", "input": "weather?", "tools": [FUNCTION_TOOL]})
    types = [t for t, _ in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    added = events[2][1]["item"]
    assert added["type"] == "function_call"
    assert added["arguments"] == ""
    deltas = [e for t, e in events if t == "response.function_call_arguments.delta"]
    assert len(deltas) > 1
    assert all(d["item_id"] == added["id"] for d in deltas)
    assert "".join(d["delta"] for d in deltas) == events[-3][1]["arguments"]

    with client.responses.stream(model="m", input="weather?", tools=[FUNCTION_TOOL]) as stream:
        final = stream.get_final_response()
    assert final.output[0].type == "function_call"
    assert json.loads(final.output[0].arguments)["unit"] == "celsius"


def test_tool_choice_none_answers_text(client: openai.OpenAI) -> None:
    response = client.responses.create(model="m", input="hi", tools=[FUNCTION_TOOL], tool_choice="none")
    assert response.output[0].type == "message"


class Color(BaseModel):
    name: str
    hex: str


class Palette(BaseModel):
    title: str
    size: int
    ratio: float
    public: bool
    mood: str | None
    colors: list[Color]


def test_structured_output_with_sdk_parse(client: openai.OpenAI) -> None:
    parsed = client.responses.parse(model="gpt-4.1", input="a palette", text_format=Palette)
    palette = parsed.output_parsed
    assert isinstance(palette, Palette)
    assert len(palette.colors) == 1
    assert isinstance(palette.colors[0], Color)
    with client.responses.stream(model="gpt-4.1", input="a palette", text_format=Palette) as stream:
        final = stream.get_final_response()
    assert final.output_parsed == palette


def test_reasoning_adds_an_item_and_counts_reasoning_tokens(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model="o4-mini",
        input="think",
        reasoning={"effort": "low", "summary": "auto"},
        include=["reasoning.encrypted_content"],
    ) as stream:
        summary_deltas = [e.delta for e in stream if e.type == "response.reasoning_summary_text.delta"]
        final = stream.get_final_response()
    reasoning, message = final.output
    assert reasoning.type == "reasoning"
    assert message.type == "message"
    assert reasoning.summary[0].text == "".join(summary_deltas)
    assert reasoning.encrypted_content
    assert final.usage is not None
    assert final.usage.output_tokens_details.reasoning_tokens > 0
    assert final.usage.output_tokens == final.usage.output_tokens_details.reasoning_tokens + 16


def test_prompt_cache_key_reports_write_then_read(fresh: Upstream, client: openai.OpenAI) -> None:
    long_input = "tell me a long story " * 20
    first = client.responses.create(model="m", input=long_input, prompt_cache_key="tenant-a")
    second = client.responses.create(model="m", input=long_input, prompt_cache_key="tenant-a")
    assert first.usage is not None
    assert second.usage is not None
    assert first.usage.input_tokens_details.cached_tokens == 0
    assert first.usage.input_tokens_details.cache_write_tokens > 0
    assert second.usage.input_tokens_details.cached_tokens == first.usage.input_tokens_details.cache_write_tokens
    assert second.usage.input_tokens_details.cache_write_tokens == 0
    stats = fresh.stats()
    assert stats["cached_tokens"] == second.usage.input_tokens_details.cached_tokens
    assert stats["cache_write_tokens"] == first.usage.input_tokens_details.cache_write_tokens


def test_max_output_tokens_makes_the_response_incomplete(upstream: Upstream, client: openai.OpenAI) -> None:
    response = client.responses.create(model="m", input="hi", max_output_tokens=5)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert len(response.output_text.split(" ")) == 5
    events = post_stream(upstream, {"model": "m", "input": "hi", "max_output_tokens": 5})
    assert events[-1][0] == "response.incomplete"
    assert sum(t == "response.output_text.delta" for t, _ in events) == 5
    assert events[-1][1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


# --- faults ---------------------------------------------------------------------------------------


def test_rate_limit_status_and_retry_after_via_metadata(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client.responses.create(model="m", input="hi", metadata={"fake_status": "429", "fake_retry_after": "7"})
    error = caught.value
    assert error.status_code == 429
    assert error.response.headers["retry-after"] == "7"
    assert error.response.headers["x-ratelimit-reset-requests"] == "7s"
    assert error.code == "rate_limit_exceeded"
    assert set(error.response.json()["error"]) == {"message", "type", "param", "code"}


def test_status_faults_via_headers(upstream: Upstream) -> None:
    quota = upstream.http.post(
        "/v1/responses",
        json={"model": "m"},
        headers={"x-fake-status": "429", "x-fake-error-code": "insufficient_quota"},
    )
    assert quota.status_code == 429
    assert quota.json()["error"]["code"] == quota.json()["error"]["type"] == "insufficient_quota"
    unauthorized = upstream.http.post("/v1/responses", json={"model": "m"}, headers={"x-fake-status": "401"})
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error"]["code"] == "invalid_api_key"
    overloaded = upstream.http.post(
        "/v1/responses", json={"model": "m", "stream": True}, headers={"x-fake-status": "503"}
    )
    assert overloaded.status_code == 503  # errors before the stream starts are plain JSON
    assert overloaded.json()["error"]["type"] == "server_error"


def test_cut_stream_closes_without_terminal_event(upstream: Upstream, client: openai.OpenAI) -> None:
    seen: list[str] = []

    def read_events() -> None:
        body = {"model": "m", "input": "hi", "stream": True, "metadata": {"fake_cut_after": "3"}}
        with upstream.http.stream("POST", "/v1/responses", json=body) as response:
            seen.extend(line[len("event: ") :] for line in response.iter_lines() if line.startswith("event: "))

    with pytest.raises(httpx.RemoteProtocolError):  # the chunked body never ends properly
        read_events()
    assert seen == ["response.created", "response.in_progress", "response.output_item.added"]

    with (
        pytest.raises(openai.APIConnectionError),
        client.responses.stream(model="m", input="hi", metadata={"fake_cut_after": "5"}) as stream,
    ):
        for _ in stream:
            pass


def test_cut_non_stream_sends_a_partial_body(upstream: Upstream) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        upstream.http.post("/v1/responses", json={"model": "m"}, headers={"x-fake-cut-after": "0"})


def test_fail_after_sends_error_then_response_failed(upstream: Upstream, client: openai.OpenAI) -> None:
    events = post_stream(upstream, {"model": "m", "input": "hi", "metadata": {"fake_fail_after": "5"}})
    types = [t for t, _ in events]
    assert types[5:] == ["error", "response.failed"]
    assert [e["sequence_number"] for _, e in events] == list(range(7))
    error = events[5][1]
    assert error["code"] == "server_error"
    assert error["message"]
    assert "param" in error
    failed = events[6][1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "server_error"
    assert failed["id"] == events[0][1]["response"]["id"]

    with client.responses.stream(model="m", input="hi", metadata={"fake_fail_after": "4"}) as stream:
        sdk_types = [event.type for event in stream]
    assert sdk_types[-2:] == ["error", "response.failed"]


def test_no_usage_reports_null_and_is_not_counted(fresh: Upstream, client: openai.OpenAI) -> None:
    response = client.responses.create(model="m", input="hi", metadata={"fake_no_usage": "1"})
    assert response.usage is None
    with client.responses.stream(model="m", input="hi", extra_headers={"x-fake-no-usage": "true"}) as stream:
        assert stream.get_final_response().usage is None
    stats = fresh.stats()
    assert stats["requests"] == 2
    assert stats["output_tokens"] == 0
    assert stats["input_tokens"] == 0


def test_hang_never_answers(upstream: Upstream) -> None:
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        upstream.http.post("/v1/responses", json={"model": "m", "metadata": {"fake_hang": "1"}}, timeout=0.3)
    assert time.monotonic() - started >= 0.3
    assert upstream.http.get("/health").status_code == 200  # the server is fine after the client gave up


def test_latency_delays_the_first_byte(upstream: Upstream) -> None:
    started = time.monotonic()
    response = upstream.http.post("/v1/responses", json={"model": "m"}, headers={"x-fake-latency-ms": "150"})
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.15


# --- introspection --------------------------------------------------------------------------------


def test_requests_history_records_body_and_headers(fresh: Upstream) -> None:
    body = {"model": "gpt-4.1", "input": "record me", "metadata": {"tenant": "t1"}}
    fresh.http.post("/v1/responses", json=body, headers={"authorization": "Bearer sk-upstream-1"})
    fresh.http.post("/v1/responses", json={"model": "second"})
    history = fresh.http.get("/_fake/requests").json()
    assert [entry["body"]["model"] for entry in history] == ["gpt-4.1", "second"]  # newest last
    first = history[0]
    assert first["method"] == "POST"
    assert first["path"] == "/v1/responses"
    assert first["body"] == body
    assert first["headers"]["authorization"] == "Bearer sk-upstream-1"


def test_stats_sum_the_reported_usage(fresh: Upstream, client: openai.OpenAI) -> None:
    usages = [client.responses.create(model="m", input="count me " * n).usage for n in (1, 5)]
    with client.responses.stream(model="m", input="and me") as stream:
        usages.append(stream.get_final_response().usage)
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model="m", input="x", metadata={"fake_status": "500"})
    stats = fresh.stats()
    assert all(u is not None for u in usages)
    assert stats["requests"] == 4
    assert stats["streams"] == 1
    assert stats["errors"] == 1
    assert stats["input_tokens"] == sum(u.input_tokens for u in usages if u)
    assert stats["output_tokens"] == sum(u.output_tokens for u in usages if u)
    assert stats["total_tokens"] == stats["input_tokens"] + stats["output_tokens"]


def test_runtime_config_changes_defaults(fresh: Upstream) -> None:
    try:
        assert fresh.http.post("/_fake/config", json={"tokens": 3}).json()["tokens"] == 3
        text = fresh.http.post("/v1/responses", json={"model": "m"}).json()["output"][0]["content"][0]["text"]
        assert len(text.split(" ")) == 3
        assert fresh.http.post("/_fake/config", json={"nope": 1}).status_code == 400
    finally:
        fresh.http.post("/_fake/config", json={"tokens": 16})


# --- server flags ---------------------------------------------------------------------------------


def test_require_key_and_models_flags() -> None:
    server = Upstream("--require-key", "sk-right", "--models", "gpt-a,gpt-b")
    try:
        wrong = server.http.post("/v1/responses", json={"model": "gpt-a"}, headers={"authorization": "Bearer sk-no"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        right = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-right", max_retries=0)
        assert right.responses.create(model="gpt-a", input="hi").status == "completed"
        with pytest.raises(openai.NotFoundError):
            right.responses.create(model="gpt-zzz", input="hi")
        assert [m.id for m in right.models.list()] == ["gpt-a", "gpt-b"]
    finally:
        assert server.stop() == 0


def test_workers_share_the_port() -> None:
    server = Upstream("--workers", "2")
    try:
        ids = {server.http.post("/v1/responses", json={"model": "m"}).json()["id"] for _ in range(6)}
        assert len(ids) == 6
    finally:
        assert server.stop() == 0


def test_agents_sdk_runs_a_tool_loop(upstream: Upstream) -> None:
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    calls = []

    @agents.function_tool
    def lookup(city: str) -> str:
        """Look a city up."""
        calls.append(city)
        return f"{city} is lovely"

    model = agents.OpenAIResponsesModel(
        model="gpt-4.1", openai_client=openai.AsyncOpenAI(base_url=upstream.url + "/v1", api_key="sk", max_retries=0)
    )
    agent = agents.Agent(name="t", instructions="use the tool", tools=[lookup], model=model)
    result = agents.Runner.run_sync(agent, "tell me about Paris")
    assert calls == ["x"]
    assert result.final_output == "The tool said: x is lovely"
