"""A fast, faithful fake of OpenAI's ``POST /v1/responses`` for tests and benchmarks.

Run it with ``python -m gateway.devtools.fake_upstream --port 8900`` (no Django involved: the benchmark starts
it that way) or ``python manage.py fake_upstream``. When ready it prints exactly one line
``fake upstream listening on http://HOST:PORT`` to stdout.

Why no framework: a benchmark drives ~19k req/s at it from ``wrk`` on a 2-core machine, so it must not
be the bottleneck. It is a raw :class:`asyncio.Protocol` with ``httptools`` parsing, HTTP/1.1
keep-alive (and pipelining), uvloop when available and orjson bodies. Each answer is a *script* of
steps (bytes, pauses, cut, hang) played synchronously up to its first pause, so the common case never
creates a task and goes out in one ``write``. SSE is chunked, one chunk per event frame: with no
event delay all frames leave in that one write; with a delay each frame is written when it is due.
Stateless answers to a body seen twice are replayed from :class:`AnswerCache` with fresh ids.

Endpoints: ``POST /v1/responses`` (and ``/responses``), ``POST /v1/responses/compact`` and
``POST /v1/responses/input_tokens`` (JSON only, same knobs), ``GET /v1/models`` (and ``/models``,
``/v1/models/{id}``), ``GET /health``, and for tests ``GET /_fake/stats``, ``POST /_fake/reset``,
``GET /_fake/requests`` (last bodies and headers received, newest last), ``GET|POST /_fake/config``.
The knob ``expect_items`` (header ``x-fake-expect-items`` or metadata ``fake_expect_items``) makes
it answer 400 ``context_mismatch`` unless the request's ``input`` holds exactly that many items.

Per-request knobs, as ``x-fake-<name>`` headers or ``fake_<name>`` metadata keys (headers win; ``-``
in header names is ``_`` in metadata keys): ``tokens``, ``latency-ms``, ``event-delay-ms``,
``status``, ``error-code``, ``retry-after``, ``cut-after``, ``fail-after``, ``hang``, ``no-usage``.
What an answer contains (filler text, function calls, structured output, reasoning, usage) is decided
in :mod:`gateway.devtools.fake_upstream.wire`. State (stats, history, caches) is per process: with
``--workers N`` each worker has its own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import random
import re
import signal
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, cast

import httptools
import orjson

from gateway.devtools.fake_upstream.wire import (
    ERRORS,
    IDS,
    JSON,
    JSON_TYPE,
    OK_HEADERS,
    SSE_TYPE,
    chunk,
    error_reply,
    estimate_input_tokens,
    fault_reply,
    final_response,
    head,
    json_reply,
    plan_answer,
    render_output,
    response_object,
    sse_frame,
    stream_events,
    usage_object,
)

DEFAULT_MODELS = ("gpt-4.1", "gpt-4.1-mini", "gpt-4o", "gpt-4o-mini", "gpt-5", "gpt-5-mini", "o4-mini")
_TRUE = frozenset({"1", "true", "yes", "on"})
_MAX_CACHE_KEYS = 100_000  # bound on remembered prompt_cache_key values (cleared when reached)


# ---------------------------------------------------------------------------------------------------
# Configuration, per-request knobs, stats
# ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Config:
    """Server-wide settings (CLI flags); ``tokens`` and the delays are defaults knobs can override."""

    tokens: int = 16
    latency_ms: float = 0.0
    event_delay_ms: float = 0.0
    models: tuple[str, ...] = ()  # empty: accept any model
    require_key: str | None = None
    fail_status: int = 500  # injected at random with probability fail_rate
    fail_rate: float = 0.0
    history: int = 50


@dataclass(slots=True)
class Knobs:
    """Effective behaviour of one request: config defaults overridden by headers/metadata."""

    tokens: int
    latency_ms: float
    event_delay_ms: float
    status: int = 0
    error_code: str | None = None
    retry_after: str | None = None
    cut_after: int = -1
    fail_after: int = -1
    hang: bool = False
    no_usage: bool = False


def _num(value: str | None, default: float) -> float:
    try:
        return float(value) if value is not None else default
    except ValueError:
        return default


def read_knobs(config: Config, raw: dict[str, str]) -> Knobs:
    """Knobs from raw ``name -> value`` strings (``_``-separated names); unparsable numbers are ignored."""
    k = Knobs(config.tokens, config.latency_ms, config.event_delay_ms)
    if raw:
        k.tokens = max(0, int(_num(raw.get("tokens"), k.tokens)))
        k.latency_ms = _num(raw.get("latency_ms"), k.latency_ms)
        k.event_delay_ms = _num(raw.get("event_delay_ms"), k.event_delay_ms)
        k.status = int(_num(raw.get("status"), 0))
        k.error_code = raw.get("error_code")
        k.retry_after = raw.get("retry_after")
        k.cut_after = int(_num(raw.get("cut_after"), -1))
        k.fail_after = int(_num(raw.get("fail_after"), -1))
        k.hang = raw.get("hang", "").lower() in _TRUE
        k.no_usage = raw.get("no_usage", "").lower() in _TRUE
    return k


@dataclass(slots=True)
class Stats:
    """Per-process totals (``GET /_fake/stats``).

    Token totals count only usage delivered in a terminal response: not cut, failed, hung or
    ``no_usage`` answers.
    """

    requests: int = 0  # POST /responses received, faults included
    streams: int = 0
    errors: int = 0  # answered with an HTTP error status
    cut: int = 0
    failed: int = 0
    hung: int = 0
    incomplete: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_tokens": self.input_tokens + self.output_tokens}


Recorded = tuple[float, bytes, bytes, list[tuple[bytes, bytes]], bytes]  # (time, method, url, headers, body)


class State:
    """What one listening server shares between its connections."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats()
        self.history: deque[Recorded] = deque(maxlen=config.history)
        self.cache_keys: set[str] = set()  # prompt_cache_key values seen
        self.answers = AnswerCache()
        self.started = time.time()

    def reset(self) -> None:
        self.stats = Stats()
        self.history = deque(maxlen=self.config.history)
        self.cache_keys.clear()
        self.answers.clear()

    def set_config(self, config: Config) -> None:
        self.config = config
        self.history = deque(self.history, maxlen=config.history)
        self.answers.clear()  # cached answers embed the old defaults


# ---------------------------------------------------------------------------------------------------
# Answer scripts and the answer cache
# ---------------------------------------------------------------------------------------------------


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


CUT = _Marker("CUT")  # close the connection now, leaving the HTTP message unfinished
HANG = _Marker("HANG")  # never answer; wait until the client goes away
Step = bytes | float | _Marker  # float: pause that many seconds


CacheKey = tuple[bytes, tuple[tuple[str, str], ...]]  # (request body, x-fake-* headers)


class CachedAnswer:
    """A replayable answer: its script with every fresh id's suffix cut out, plus its effect on stats.

    A replay joins the pieces with one new suffix, so all ids of a replayed answer share it (``resp_S``,
    ``msg_S``, ``req_S``...: still unique, the prefixes keep them apart). Suffixes all have the same
    length and timestamps 10 digits, so ``content-length`` and chunk sizes baked into the bytes stay
    right. Timestamps are re-stamped at most once a second.
    """

    __slots__ = ("second", "stats", "steps")

    def __init__(self, steps: list[Step], suffixes: list[bytes], now: int, stats: dict[str, int]) -> None:
        merged: list[Step] = []
        for step in steps:  # one run of bytes, one join on replay
            if isinstance(step, bytes) and merged and isinstance(merged[-1], bytes):
                merged[-1] += step
            else:
                merged.append(step)
        cut = re.compile(b"|".join(re.escape(suffix) for suffix in suffixes))
        self.steps: list[list[bytes] | float | _Marker] = [
            cut.split(step) if isinstance(step, bytes) else step for step in merged
        ]
        self.second = now
        self.stats = list(stats.items())

    def replay(self, state: State) -> list[Step]:
        now = int(time.time())
        if now != self.second:
            self.restamp(now)
        suffix = IDS.next_suffix()
        stats = state.stats
        for name, delta in self.stats:
            setattr(stats, name, getattr(stats, name) + delta)
        return [suffix.join(step) if isinstance(step, list) else step for step in self.steps]

    def restamp(self, now: int) -> None:
        stamps = [
            (b'"%s":%d' % (key, self.second), b'"%s":%d' % (key, now)) for key in (b"created_at", b"completed_at")
        ]
        for step in self.steps:
            if isinstance(step, list):
                for i, piece in enumerate(step):
                    for old, new in stamps:
                        piece = piece.replace(old, new)
                    step[i] = piece
        self.second = now


class AnswerCache:
    """Answers to request bodies seen twice, keyed by (body bytes, ``x-fake-*`` headers).

    Only stateless answers are cached (no fault knob, no ``prompt_cache_key``), so a replay differs
    from a fresh answer only by its ids and timestamps. An entry is built on a key's second sight, so
    a workload of unique bodies only pays for remembering keys. Both maps are bounded.
    """

    LIMIT = 1024
    MAX_BODY = 64 * 1024

    def __init__(self) -> None:
        self.entries: dict[CacheKey, CachedAnswer] = {}
        self.seen: set[CacheKey] = set()

    def clear(self) -> None:
        self.entries.clear()
        self.seen.clear()

    def answer(self, state: State, key: CacheKey, body: JSON, k: Knobs) -> list[Step]:
        """Answer a cacheable request fresh, caching the answer if ``key`` was seen before."""
        if key not in self.seen:
            if len(self.seen) >= self.LIMIT:
                self.seen.clear()
            self.seen.add(key)
            return answer(state, body, k, int(time.time()))
        before, first_id, now = asdict(state.stats), IDS.counter + 1, int(time.time())
        steps = answer(state, body, k, now)
        suffixes = [IDS.suffix(number) for number in range(first_id, IDS.counter + 1)]
        delta = {name: value - before[name] for name, value in asdict(state.stats).items() if value != before[name]}
        if len(self.entries) >= self.LIMIT:
            self.entries.clear()
        self.entries[key] = CachedAnswer(steps, suffixes, now, delta)
        return steps


# ---------------------------------------------------------------------------------------------------
# Routing and answers
# ---------------------------------------------------------------------------------------------------


class Reject(Exception):
    """An HTTP error answer decided while validating a request."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.reply = error_reply(status, message, "invalid_request_error", code, param)


@dataclass(slots=True)
class Request:
    """One parsed HTTP request, detached from the parser so pipelined requests can queue."""

    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool


def handle(state: State, req: Request) -> list[Step]:
    """Route one request and return the script answering it."""
    path = req.url.partition(b"?")[0]
    if path.startswith(b"/v1/"):
        path = path[3:]
    if path.startswith(b"/_fake/"):
        return [handle_control(state, req, path[7:])]
    if path != b"/health":  # readiness probes would crowd out what tests look for
        state.history.append((time.time(), req.method, req.url, req.headers, req.body))
    handler = _POST_HANDLERS.get(path) if req.method == b"POST" else None
    if handler is not None:
        state.stats.requests += 1
        try:
            return handler(state, req)
        except Reject as exc:
            state.stats.errors += 1
            return [exc.reply]
    models = state.config.models or DEFAULT_MODELS
    model_objects = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "fake-upstream"} for m in models]
    if req.method == b"GET" and path == b"/health":
        return [json_reply(200, {"status": "ok"})]
    if req.method == b"GET" and path == b"/models":
        return [json_reply(200, {"object": "list", "data": model_objects})]
    if req.method == b"GET" and path.startswith(b"/models/"):
        found = [m for m in model_objects if m["id"] == path[8:].decode(errors="replace")]
        if found:
            return [json_reply(200, found[0])]
    message = f"Invalid URL ({req.method.decode()} {req.url.decode(errors='replace')})"
    return [error_reply(404, message, "invalid_request_error")]


def handle_responses(state: State, req: Request) -> list[Step]:
    """Validate a ``POST /responses`` (auth, JSON, model; raising :class:`Reject`) and answer it."""
    return _checked(state, req)


def handle_compact(state: State, req: Request) -> list[Step]:
    """``POST /responses/compact``: the input's user messages kept, then one ``compaction`` item
    whose ``encrypted_content`` stands for the rest; usage like a response's (billed)."""
    return _checked(state, req, answer_json=_compaction)


def handle_input_tokens(state: State, req: Request) -> list[Step]:
    """``POST /responses/input_tokens``: ``{"object": "response.input_tokens", "input_tokens": N}``."""
    return _checked(state, req, answer_json=_input_tokens)


def _compaction(state: State, body: JSON, now: int) -> JSON:
    items = body.get("input")
    kept = [
        item
        for item in (items if isinstance(items, list) else [])
        if isinstance(item, dict) and item.get("type", "message") == "message" and item.get("role") == "user"
    ]
    input_tokens = estimate_input_tokens(body)
    output_tokens = max(1, input_tokens // 10)
    summary = base64.b64encode(orjson.dumps({"summary_of_items": len(items) if isinstance(items, list) else 1}))
    state.stats.input_tokens += input_tokens
    state.stats.output_tokens += output_tokens
    return {
        "id": IDS.new("resp"),
        "object": "response.compaction",
        "created_at": now,
        "output": [*kept, {"id": IDS.new("cmp"), "type": "compaction", "encrypted_content": summary.decode()}],
        "usage": usage_object(input_tokens, output_tokens, 0, 0, 0),
    }


def _input_tokens(state: State, body: JSON, now: int) -> JSON:
    return {"object": "response.input_tokens", "input_tokens": estimate_input_tokens(body)}


def _checked(
    state: State,
    req: Request,
    answer_json: Callable[[State, JSON, int], JSON] | None = None,
) -> list[Step]:
    """Auth, JSON and model checks shared by the POST endpoints (raising :class:`Reject`), then
    the answer: a response, or ``answer_json``'s object."""
    config = state.config
    raw: dict[str, str] = {}
    auth = b""
    for name, value in req.headers:
        lname = name.lower()
        if lname.startswith(b"x-fake-"):
            raw[lname[7:].decode().replace("-", "_")] = value.decode()
        elif lname == b"authorization":
            auth = value
    if config.require_key is not None and auth != b"Bearer " + config.require_key.encode():
        raise Reject(401, "Incorrect API key provided.", "invalid_api_key")
    forced = config.fail_status if config.fail_rate and random.random() < config.fail_rate else 0
    key = (req.body, tuple(raw.items()))
    if not forced and answer_json is None:
        cached = state.answers.entries.get(key)
        if cached is not None:
            return cached.replay(state)
    try:
        body = orjson.loads(req.body)
    except orjson.JSONDecodeError as exc:
        raise Reject(400, f"We could not parse the JSON body of your request. ({exc})") from None
    if not isinstance(body, dict):
        raise Reject(400, "The request body must be a JSON object.")
    metadata = body.get("metadata")
    if metadata and isinstance(metadata, dict):
        for key, value in metadata.items():
            if key.startswith("fake_"):
                raw.setdefault(key[5:], str(value))
    expected = raw.get("expect_items")
    if expected is not None:
        # The whole context must arrive with every turn (a gateway's stateful policy): the
        # test names how many input items this request must carry.
        received = len(body["input"]) if isinstance(body.get("input"), list) else 1
        if str(received) != expected.strip():
            raise Reject(
                400, f"The fake upstream expected {expected} input items, received {received}.", "context_mismatch"
            )
    k = read_knobs(config, raw)
    k.status = k.status or forced
    model = body.get("model")
    if not k.status and not isinstance(model, str):
        raise Reject(400, "Missing required parameter: 'model'.", "missing_required_parameter", "model")
    if not k.status and config.models and model not in config.models:
        raise Reject(404, f"The model `{model}` does not exist or you do not have access to it.", "model_not_found")
    if answer_json is not None:
        steps: list[Step] = [k.latency_ms / 1000.0] if k.latency_ms > 0 else []
        if k.hang:
            state.stats.hung += 1
            return [HANG]
        if k.status:
            state.stats.errors += 1
            return [*steps, fault_reply(k.status, k.error_code, k.retry_after)]
        if body.get("stream"):
            raise Reject(400, "Unsupported parameter: 'stream'.", "unsupported_parameter", "stream")
        return [*steps, json_reply(200, answer_json(state, body, int(time.time())), OK_HEADERS)]
    stateless = not (k.status or k.hang or k.cut_after >= 0 or k.fail_after >= 0 or "prompt_cache_key" in body)
    if stateless and len(req.body) <= AnswerCache.MAX_BODY:
        return state.answers.answer(state, key, body, k)
    return answer(state, body, k, int(time.time()))


def answer(state: State, body: JSON, k: Knobs, now: int) -> list[Step]:
    """The script answering a valid ``POST /responses`` body under knobs ``k`` at time ``now``."""
    steps: list[Step] = [k.latency_ms / 1000.0] if k.latency_ms > 0 else []
    stats = state.stats
    if k.hang:
        stats.hung += 1
        return [HANG]
    if k.status:
        stats.errors += 1
        return [*steps, fault_reply(k.status, k.error_code, k.retry_after)]

    plan = plan_answer(body, k.tokens)
    rendered = render_output(plan)
    response = response_object(body, IDS.new("resp"), now)
    output_tokens = plan.reasoning_tokens + len(plan.pieces)
    cached = written = 0
    key = body.get("prompt_cache_key")
    if isinstance(key, str):
        # A deterministic "prefix" share of the prompt: written on first sight, read afterwards.
        portion = plan.input_tokens // 2
        if key in state.cache_keys:
            cached = portion
        else:
            written = portion
            if len(state.cache_keys) >= _MAX_CACHE_KEYS:
                state.cache_keys.clear()
            state.cache_keys.add(key)
    usage = (
        None if k.no_usage else usage_object(plan.input_tokens, output_tokens, plan.reasoning_tokens, cached, written)
    )
    final = final_response(response, plan, rendered, now, usage)
    stream = bool(body.get("stream"))
    delivered = k.fail_after < 0 and k.cut_after < 0
    stats.streams += stream
    stats.failed += k.fail_after >= 0
    stats.cut += k.fail_after < 0 <= k.cut_after
    if delivered and usage is not None:
        stats.input_tokens += plan.input_tokens
        stats.output_tokens += output_tokens
        stats.reasoning_tokens += plan.reasoning_tokens
        stats.cached_tokens += cached
        stats.cache_write_tokens += written
        stats.incomplete += plan.incomplete

    if not stream:
        if k.fail_after >= 0:  # a non-streamed failure is a plain 5xx, as OpenAI answers it
            return [*steps, error_reply(500, ERRORS[500][2], "server_error", k.error_code)]
        payload = orjson.dumps(final)
        if k.cut_after >= 0:  # promise the whole body, deliver half, hang up
            return [*steps, head(200, JSON_TYPE, len(payload), OK_HEADERS) + payload[: len(payload) // 2], CUT]
        return [*steps, head(200, JSON_TYPE, len(payload), OK_HEADERS) + payload]

    events = list(stream_events(plan, rendered, response, final))
    if k.fail_after >= 0:  # K events, then `error` and `response.failed`, then a proper end of stream
        events = events[: min(k.fail_after, len(events) - 1)]
        error = {"code": k.error_code or "server_error", "message": ERRORS[500][2]}
        events.append({"type": "error", **error, "param": None})
        events.append({"type": "response.failed", "response": {**response, "status": "failed", "error": error}})
    elif k.cut_after >= 0:
        events = events[: k.cut_after]
    delay = k.event_delay_ms / 1000.0
    steps.append(head(200, SSE_TYPE, None, OK_HEADERS))
    for seq, event in enumerate(events):
        if delay and seq:
            steps.append(delay)
        event["sequence_number"] = seq
        steps.append(chunk(sse_frame(event)))
    steps.append(CUT if k.fail_after < 0 <= k.cut_after else b"0\r\n\r\n")
    return steps


_POST_HANDLERS: dict[bytes, Callable[[State, Request], list[Step]]] = {
    b"/responses": handle_responses,
    b"/responses/compact": handle_compact,
    b"/responses/input_tokens": handle_input_tokens,
}


def handle_control(state: State, req: Request, name: bytes) -> bytes:
    """The ``/_fake/*`` test endpoints: stats, reset, requests, config."""
    if name == b"stats" and req.method == b"GET":
        return json_reply(200, {**state.stats.as_dict(), "pid": os.getpid(), "uptime_s": time.time() - state.started})
    if name == b"reset" and req.method == b"POST":
        state.reset()
        return json_reply(200, {"reset": True})
    if name == b"requests" and req.method == b"GET":
        return json_reply(200, [describe(entry) for entry in state.history])
    if name == b"config" and req.method in (b"GET", b"POST"):
        if req.method == b"POST":
            try:
                state.set_config(make_config(state.config, **orjson.loads(req.body or b"{}")))
            except (TypeError, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
                return error_reply(400, str(exc), "invalid_request_error")
        return json_reply(200, asdict(state.config))
    return error_reply(404, f"Unknown control endpoint /_fake/{name.decode()}", "invalid_request_error")


def describe(entry: Recorded) -> JSON:
    """A recorded request as JSON: header names lowercased (repeats joined by ", "), body parsed if JSON."""
    received_at, method, url, raw_headers, raw_body = entry
    headers: dict[str, str] = {}
    for name, value in raw_headers:
        key = name.decode().lower()
        headers[key] = f"{headers[key]}, {value.decode()}" if key in headers else value.decode()
    body: Any
    try:
        body = orjson.loads(raw_body)
    except orjson.JSONDecodeError:
        body = raw_body.decode(errors="replace")
    return {
        "received_at": received_at,
        "method": method.decode(),
        "path": url.decode(),
        "headers": headers,
        "body": body,
    }


# ---------------------------------------------------------------------------------------------------
# HTTP/1.1 connection
# ---------------------------------------------------------------------------------------------------


class Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection.

    Requests are answered in order: a script with a pause runs as ``task``, and requests pipelined
    behind it wait in ``queue``. Reading is never paused, so a client hanging up is always noticed.
    """

    def __init__(self, state: State) -> None:
        self.state = state
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.queue: deque[Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass it

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            assert self.transport is not None
            self.transport.write(error_reply(400, "Malformed HTTP request.", "invalid_request_error"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            assert self.transport is not None  # curl waits for this before sending large bodies
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        req = Request(parser.get_method(), self.url, self.headers, b"".join(self.body), parser.should_keep_alive())
        if self.task is None:
            self.respond(req)
        else:
            self.queue.append(req)

    def respond(self, req: Request) -> None:
        try:
            steps = handle(self.state, req)
        except Exception as exc:  # a bug here must show up as a 500, not as a malformed-request 400
            traceback.print_exc()
            steps = [error_reply(500, f"fake upstream bug: {exc!r}", "server_error")]
        self.play(steps, req.keep_alive)

    def play(self, steps: Sequence[Step], keep_alive: bool) -> None:
        """Write the leading bytes of ``steps`` now; hand the rest to a task at the first pause."""
        transport = self.transport
        assert transport is not None
        if transport.is_closing():
            return
        pending: list[bytes] = []
        for i, step in enumerate(steps):
            if isinstance(step, bytes):
                pending.append(step)
                continue
            if pending:
                transport.write(b"".join(pending))
            if step is CUT:
                transport.close()
            else:
                self.task = asyncio.get_running_loop().create_task(self.play_later(steps[i:], keep_alive))
            return
        # No pause: the whole answer in one write (one syscall); each SSE frame is still its own chunk.
        # (uvloop's writelines defers to the next loop turn and costs ~4x more than an immediate write.)
        transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if not keep_alive:
            transport.close()

    async def play_later(self, steps: Sequence[Step], keep_alive: bool) -> None:
        """Play a script with pauses: sleep, write each frame as it is due, honour flow control."""
        transport = self.transport
        assert transport is not None
        for step in steps:
            if transport.is_closing():
                return
            if isinstance(step, bytes):
                transport.write(step)
                await self.writable.wait()
            elif isinstance(step, float):
                await asyncio.sleep(step)
            elif step is HANG:
                await self.closed
                return
            else:  # CUT
                transport.close()
                return
        if not keep_alive:
            transport.close()
            return
        self.task = None
        while self.queue and self.task is None and not transport.is_closing():
            self.respond(self.queue.popleft())


# ---------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------


def make_config(base: Config | None = None, **options: Any) -> Config:
    """A :class:`Config` from keyword options (``models`` may be "a,b"); unknown names raise ``TypeError``."""
    unknown = set(options) - {f.name for f in fields(Config)}
    if unknown:
        raise TypeError(f"unknown fake upstream options: {sorted(unknown)}")
    models = options.get("models")
    if models is not None:
        names = models.split(",") if isinstance(models, str) else models
        options["models"] = tuple(m.strip() for m in names if m.strip())
    return replace(base or Config(), **options)


async def start_server(
    host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False, **options: Any
) -> asyncio.Server:
    """Listen in the running loop and return the ``asyncio.Server`` (``port=0`` picks a free port).

    ``options`` are :class:`Config` fields (``tokens``, ``latency_ms``, ``models``...). The caller owns
    the server: ``server.close(); await server.wait_closed()``.
    """
    state = State(make_config(**options))
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Connection(state), host, port, reuse_port=reuse_port or None, backlog=4096)


async def _run(host: str, port: int, options: dict[str, Any], ready_fd: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT; announce readiness on stdout, or on ``ready_fd`` in a worker."""
    server = await start_server(host, port, reuse_port=ready_fd is not None, **options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_fd is None:
        print(f"fake upstream listening on http://{host}:{server.sockets[0].getsockname()[1]}", flush=True)
    else:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    await stop.wait()
    server.close()


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve(host: str = "127.0.0.1", port: int = 8900, *, workers: int = 1, **options: Any) -> None:
    """Run the fake upstream until SIGTERM/SIGINT (blocking).

    ``workers > 1`` forks that many processes listening on the same port with ``SO_REUSEPORT``; stats
    and request history are then per worker.
    """
    _install_uvloop()
    make_config(**options)  # fail on bad options before forking
    if workers <= 1:
        asyncio.run(_run(host, port, options))
        return
    holder = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, port))  # resolves port 0 once and reserves the port for the workers
    port = holder.getsockname()[1]
    ready_read, ready_write = os.pipe()
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # worker: never return into the parent's code path
            code = 1
            try:
                os.close(ready_read)
                IDS.reseed()  # ids must stay unique across workers
                asyncio.run(_run(host, port, options, ready_write))
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    os.close(ready_write)

    def stop_children(signum: int = signal.SIGTERM, frame: object = None) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_children)
    signal.signal(signal.SIGINT, stop_children)
    # Each worker writes one byte when listening; EOF first means one died (all write ends closed).
    if any(os.read(ready_read, 1) != b"1" for _ in children):
        stop_children()
        for child in children:
            os.waitpid(child, 0)
        raise SystemExit("fake upstream: a worker failed to start")
    holder.close()
    print(f"fake upstream listening on http://{host}:{port}", flush=True)
    for child in children:
        os.waitpid(child, 0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The CLI flags, shared with ``manage.py fake_upstream``."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8900, help="0 picks a free port (shown on the ready line)")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port via SO_REUSEPORT")
    p.add_argument("--tokens", type=int, default=16, help="output tokens per answer (x-fake-tokens overrides)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay before the first byte")
    p.add_argument("--event-delay-ms", type=float, default=0.0, help="delay between SSE events")
    p.add_argument("--models", default="", help="comma-separated models served (default: accept any)")
    p.add_argument("--require-key", default=None, help="answer 401 unless Authorization is 'Bearer KEY'")
    p.add_argument("--fail-status", type=int, default=500, help="status injected at --fail-rate")
    p.add_argument("--fail-rate", type=float, default=0.0, help="fraction of requests answered --fail-status")
    p.add_argument("--history", type=int, default=50, help="requests kept for GET /_fake/requests")


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """CLI namespace -> ``serve()`` keyword options (all but host/port)."""
    names = ("workers", "tokens", "latency_ms", "event_delay_ms", "models", "require_key", "fail_status")
    return {name: getattr(args, name) for name in (*names, "fail_rate", "history")}


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m gateway.devtools.fake_upstream``."""
    parser = argparse.ArgumentParser(
        prog="python -m gateway.devtools.fake_upstream", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    serve(args.host, args.port, **options_from_args(args))


if __name__ == "__main__":
    main(sys.argv[1:])
