"""Wire builders for the fake upstream: response objects, usage, SSE frames and error envelopes.

Everything here is pure (no sockets, no clock reads except where a timestamp is passed in) so that
the server module stays about HTTP and the shapes here can be checked against
``/work/shared/RESPONSES_WIRE.md`` in one place. Must not import Django: the benchmark runs the fake
upstream as ``python -m gateway.devtools.fake_upstream.server`` without settings.

Contracts kept (RESPONSES_WIRE.md):
- response objects always carry every key of §1 (nullable ones as ``null``);
- usage always carries both ``input_tokens_details`` keys and ``output_tokens_details.reasoning_tokens``;
- SSE frames are ``event: <type>\\ndata: <one-line JSON incl. "type">\\n\\n``;
- ``sequence_number`` starts at 0 and rises by 1 per event of one stream;
- lifecycle events of one stream all carry the same ``response.id``.
"""

from __future__ import annotations

import base64
import http
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

JSON = dict[str, Any]

# Deterministic filler vocabulary: one word = one "token" = one output_text.delta.
_WORDS = (
    *("The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "the", "gateway", "relays"),
    *("every", "token", "faithfully", "and", "the", "benchmark", "counts", "requests", "per", "second", "calmly"),
)

_REASONING_TOKENS = {"minimal": 8, "low": 16, "medium": 32, "high": 64, "xhigh": 128}
_ENCRYPTED_REASONING = "gAAAAABfakeEncryptedReasoningContentForTestsOnly=="


class IdFactory:
    """Cheap unique ids: ``<prefix>_<process-random hex><counter hex>``.

    Unique per process by the counter and across processes (``--workers``) by the random part,
    which :meth:`reseed` must refresh after a fork. Every id's part after the prefix (its *suffix*)
    has the same length, which lets cached answers swap ids without changing any length.
    """

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        """Pick a new process-random part and restart the counter (call in each forked worker)."""
        self.salt = os.urandom(6).hex()
        self.counter = 0

    def new(self, prefix: str) -> str:
        """Return a fresh id such as ``resp_1a2b3c4d5e6f0000000000000001``."""
        self.counter += 1
        return f"{prefix}_{self.salt}{self.counter:016x}"

    def suffix(self, number: int) -> bytes:
        """The suffix of the id issued as ``number`` (see :attr:`counter`)."""
        return f"{self.salt}{number:016x}".encode()

    def next_suffix(self) -> bytes:
        """Reserve one new suffix (a replayed answer gives it to all its ids: prefixes keep them apart)."""
        self.counter += 1
        return f"{self.salt}{self.counter:016x}".encode()


IDS = IdFactory()


def error_envelope(message: str, type: str, param: str | None = None, code: str | None = None) -> JSON:
    """The OpenAI error body: all four keys always present (RESPONSES_WIRE.md §5)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------------
# HTTP/1.1 framing
# ---------------------------------------------------------------------------------------------------

_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
# Headers OpenAI sends on every success; static because nothing here rate-limits for real.
OK_HEADERS = (
    b"openai-version: 2020-10-01\r\nopenai-processing-ms: 1\r\n"
    b"x-ratelimit-limit-requests: 10000\r\nx-ratelimit-remaining-requests: 9999\r\n"
    b"x-ratelimit-reset-requests: 6ms\r\nx-ratelimit-limit-tokens: 30000000\r\n"
    b"x-ratelimit-remaining-tokens: 29999000\r\nx-ratelimit-reset-tokens: 2ms\r\n"
)
SSE_TYPE = b"text/event-stream; charset=utf-8"
JSON_TYPE = b"application/json"
# status -> (type, code, message) as OpenAI answers them.
ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Fake upstream: injected bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to sample from this model."),
    404: ("invalid_request_error", "not_found", "Not found."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The server is overloaded or not ready yet."),
}


def head(status: int, content_type: bytes, length: int | None, extra: bytes = b"") -> bytes:
    """An HTTP/1.1 response head with a fresh ``x-request-id``; ``length=None`` means chunked."""
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    reason = _REASONS.get(status, b"Unknown")
    request_id = IDS.new("req").encode()
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\n%s\r\nx-request-id: %s\r\n%s\r\n" % (
        status,
        reason,
        content_type,
        framing,
        request_id,
        extra,
    )


def json_reply(status: int, payload: Any, extra: bytes = b"") -> bytes:
    """A complete JSON answer (head + body, ``content-length`` framed)."""
    body = orjson.dumps(payload)
    return head(status, JSON_TYPE, len(body), extra) + body


def error_reply(status: int, message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    """A non-2xx answer with the OpenAI error envelope."""
    return json_reply(status, error_envelope(message, type, param, code))


def fault_reply(status: int, error_code: str | None, retry_after: str | None) -> bytes:
    """An injected error: type/code/message like OpenAI's for ``status``; ``Retry-After`` when asked."""
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    type_, code, message = ERRORS.get(status, (default_type, None, f"Fake upstream: injected {status}."))
    if error_code:
        code = error_code
        if code == "insufficient_quota":
            type_, message = "insufficient_quota", "You exceeded your current quota."
    extra = b"x-ratelimit-remaining-requests: 0\r\n" if status == 429 else b""
    if retry_after is not None:
        extra += b"retry-after: %s\r\nx-ratelimit-reset-requests: %ss\r\n" % (
            retry_after.encode(),
            retry_after.encode(),
        )
    return json_reply(status, error_envelope(message, type_, None, code), extra)


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (SSE goes out one chunk per event frame)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


_FILLER_CACHE: dict[int, tuple[str, ...]] = {}


def filler_pieces(n: int) -> tuple[str, ...]:
    """``n`` deterministic word pieces (the first bare, the rest with a leading space); cached per ``n``."""
    pieces = _FILLER_CACHE.get(n)
    if pieces is None:
        pieces = tuple(_WORDS[i % len(_WORDS)] if i == 0 else " " + _WORDS[i % len(_WORDS)] for i in range(n))
        if len(_FILLER_CACHE) < 4096:  # bounded: token counts come from clients
            _FILLER_CACHE[n] = pieces
    return pieces


def word_pieces(text: str) -> list[str]:
    """Split ``text`` on single spaces so that ``"".join(pieces) == text`` exactly."""
    words = text.split(" ")
    return [words[0], *(" " + w for w in words[1:])]


def char_pieces(text: str, size: int = 4) -> list[str]:
    """Split ``text`` into ``size``-character pieces (~one token each, for JSON payloads)."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


# ---------------------------------------------------------------------------------------------------
# JSON Schema -> example instance (function arguments and structured output)
# ---------------------------------------------------------------------------------------------------

_STRING_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00",
    "email": "x@example.com",
    "uri": "https://example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def example_from_schema(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """Build a deterministic instance valid against ``schema``.

    Handles what function tools and ``responses.parse(text_format=PydanticModel)`` send: objects
    (every property filled, so ``required`` holds), arrays (``minItems`` or one element), strings
    ("x", honouring ``enum``/``const``/``format``/``minLength``), numbers (1 within bounds), booleans
    (true), null, ``$ref`` into ``$defs``/``definitions``, ``anyOf``/``oneOf``/``allOf`` and type lists.
    Past depth 8 it prefers null branches and empty arrays, so recursive models terminate.
    """
    root = schema if root is None else root
    deep = depth > 8
    if not isinstance(schema, dict) or depth > 64:
        return None
    if "$ref" in schema:
        return example_from_schema(_resolve_ref(root, schema["$ref"]), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            # Prefer a non-null branch so Optional[...] fields get a real value (until deep in a recursion).
            nulls = [o for o in options if isinstance(o, dict) and o.get("type") == "null"]
            chosen = nulls[0] if deep and nulls else next((o for o in options if o not in nulls), options[0])
            return example_from_schema(chosen, root, depth + 1)
    if isinstance(schema.get("allOf"), list) and schema["allOf"]:
        merged: JSON = {}
        for part in schema["allOf"]:
            merged.update(_resolve_ref(root, part["$ref"]) if isinstance(part, dict) and "$ref" in part else part)
        return example_from_schema(merged, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: example_from_schema(sub, root, depth + 1) for name, sub in props.items()}
    if kind == "array":
        items = schema.get("items", {})
        if isinstance(schema.get("prefixItems"), list):
            return [example_from_schema(s, root, depth + 1) for s in schema["prefixItems"]]
        count = int(schema.get("minItems", 0 if deep else 1))
        return [example_from_schema(items, root, depth + 1) for _ in range(max(0 if deep else 1, count))]
    if kind in ("number", "integer"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        value = 1 if low is None else (int(low) + 1 if "exclusiveMinimum" in schema else low)
        high = schema.get("maximum")
        if high is not None and value > high:
            value = high
        return int(value) if kind == "integer" else value
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    text = _STRING_FORMATS.get(schema.get("format", ""), "x")
    return text * max(1, -(-int(schema.get("minLength", 1)) // len(text)))


def _resolve_ref(root: Any, ref: str) -> Any:
    """Follow a local JSON pointer such as ``#/$defs/Item``; unknown refs resolve to ``{}``."""
    node = root
    for part in ref.lstrip("#/").split("/") if ref.startswith("#") else ():
        node = node.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(node, dict) else {}
    return node


# ---------------------------------------------------------------------------------------------------
# What to answer
# ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Plan:
    """The decided content of one answer, before any id or timestamp is assigned.

    ``kind`` is ``"text"`` (``pieces`` are output_text deltas), ``"function_call"`` (``pieces`` are
    argument deltas of a call to ``tool_name``) or ``"compaction"`` (one ``compaction`` item; the
    pieces count as its output tokens). ``reasoning_tokens`` > 0 adds a leading reasoning
    item; ``incomplete`` means ``max_output_tokens`` cut the output.
    """

    kind: str
    pieces: list[str] | tuple[str, ...]
    tool_name: str = ""
    reasoning_tokens: int = 0
    reasoning_summary: str | None = None
    encrypted_reasoning: bool = False
    incomplete: bool = False
    input_tokens: int = 1


def estimate_input_tokens(req: JSON) -> int:
    """Deterministic, cheap input token estimate: bytes of ``input`` + ``instructions`` // 4, at least 1."""
    size = 0
    for key in ("input", "instructions"):
        value = req.get(key)
        if isinstance(value, str):
            size += len(value.encode())
        elif value is not None:
            size += len(orjson.dumps(value))
    return max(1, size // 4)


def _tool_output_text(item: JSON) -> str:
    """Text of a ``function_call_output`` (string or list of content parts), truncated to 60 chars."""
    output = item.get("output", "")
    if isinstance(output, list):
        output = " ".join(str(p.get("text", "")) for p in output if isinstance(p, dict))
    text = str(output)
    return text if len(text) <= 60 else text[:60] + "..."


def _pick_function_tool(req: JSON) -> JSON | None:
    """The function tool to call, or None when the answer must be text (no tools, ``tool_choice: none``)."""
    tools = [t for t in req.get("tools") or () if isinstance(t, dict) and t.get("type") == "function"]
    choice = req.get("tool_choice")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict) and choice.get("type") == "function":
        return next((t for t in tools if t.get("name") == choice.get("name")), tools[0])
    return tools[0]


def plan_answer(req: JSON, tokens: int) -> Plan:
    """Decide the answer to a parsed request body, with ``tokens`` filler tokens for plain text.

    Rules (the brief): a last input item ``compaction_trigger`` asks for a compaction (one
    ``compaction`` item); otherwise call the first function tool unless the last input item is a
    ``function_call_output`` (then say what the tool said) or a ``compaction`` (then say so);
    ``text.format.type == "json_schema"`` yields a schema-valid JSON document; ``reasoning.effort``
    adds reasoning tokens (counted in output tokens, and against ``max_output_tokens``, as OpenAI
    does).
    """
    items = req.get("input")
    last = items[-1] if isinstance(items, list) and items and isinstance(items[-1], dict) else {}
    if last.get("type") == "compaction_trigger":
        # Server-side compaction (what the Codex CLI's "compaction v2" asks for): one
        # ``compaction`` item whose encrypted content stands for the whole context.
        return Plan(
            kind="compaction",
            pieces=filler_pieces(max(1, min(tokens, 64))),
            input_tokens=estimate_input_tokens(req),
        )
    after_tool = last.get("type") == "function_call_output"
    # After a compaction the context holds no finished tool call any more: answer, don't call again.
    after_compaction = last.get("type") == "compaction"
    tool = None if after_tool or after_compaction else _pick_function_tool(req)

    reasoning = req.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    reasoning_tokens = _REASONING_TOKENS.get(str(effort), 32) if effort and effort != "none" else 0
    summary_mode = reasoning.get("summary") if isinstance(reasoning, dict) else None
    include = req.get("include") or ()

    pieces: list[str] | tuple[str, ...]
    if tool is not None:
        args = orjson.dumps(example_from_schema(tool.get("parameters") or {"type": "object"})).decode()
        kind, pieces = "function_call", char_pieces(args, 8)
    else:
        kind = "text"
        text_cfg = req.get("text")
        fmt = text_cfg.get("format") if isinstance(text_cfg, dict) else None
        fmt_type = fmt.get("type") if isinstance(fmt, dict) else None
        if fmt_type == "json_schema" and isinstance(fmt, dict):
            pieces = char_pieces(orjson.dumps(example_from_schema(fmt.get("schema") or {})).decode())
        elif fmt_type == "json_object":
            pieces = char_pieces('{"answer": "' + " ".join(_WORDS[: max(1, tokens)]) + '"}')
        elif after_tool:
            pieces = word_pieces("The tool said: " + _tool_output_text(last))
        elif after_compaction:
            pieces = word_pieces("Continuing from the compacted context.")
        else:
            pieces = filler_pieces(tokens)

    incomplete = False
    cap = req.get("max_output_tokens")
    if isinstance(cap, int) and not isinstance(cap, bool) and cap < reasoning_tokens + len(pieces):
        incomplete = True
        reasoning_tokens = min(reasoning_tokens, max(cap, 0))
        pieces = pieces[: max(cap - reasoning_tokens, 0)]
    return Plan(
        kind=kind,
        pieces=pieces,
        tool_name=str(tool.get("name", "")) if tool is not None else "",
        reasoning_tokens=reasoning_tokens,
        reasoning_summary=" ".join(_WORDS[:8])
        if reasoning_tokens and summary_mode in ("auto", "concise", "detailed")
        else None,
        encrypted_reasoning="reasoning.encrypted_content" in include if isinstance(include, list) else False,
        incomplete=incomplete,
        input_tokens=estimate_input_tokens(req),
    )


def usage_object(input_tokens: int, output_tokens: int, reasoning: int, cached: int, cache_write: int) -> JSON:
    """Usage with every detail key present (RESPONSES_WIRE.md §2); cached tokens count inside input."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": cache_write},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output_tokens,
    }


def response_object(req: JSON, resp_id: str, created_at: int) -> JSON:
    """The echo part of a response object for request body ``req``, status ``in_progress``.

    Callers set ``status``, ``output``, ``usage``, ``completed_at``, ``error``, ``incomplete_details``.
    """
    reasoning = req.get("reasoning")
    text = req.get("text")
    conversation = req.get("conversation")
    tier = req.get("service_tier")
    return {
        "id": resp_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": req.get("background", False),
        "completed_at": None,
        "conversation": {"id": conversation} if isinstance(conversation, str) else conversation,
        "error": None,
        "incomplete_details": None,
        "instructions": req.get("instructions"),
        "max_output_tokens": req.get("max_output_tokens"),
        "max_tool_calls": req.get("max_tool_calls"),
        "model": req.get("model"),
        "output": [],
        "parallel_tool_calls": req.get("parallel_tool_calls", True),
        "previous_response_id": req.get("previous_response_id"),
        "prompt_cache_key": req.get("prompt_cache_key"),
        "prompt_cache_retention": req.get("prompt_cache_retention"),
        "reasoning": {"effort": None, "summary": None, **reasoning}
        if isinstance(reasoning, dict)
        else {
            "effort": None,
            "summary": None,
        },
        "safety_identifier": req.get("safety_identifier"),
        "service_tier": "default" if tier in (None, "auto") else tier,
        "store": req.get("store", True),
        "temperature": req.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium", **text}
        if isinstance(text, dict)
        else {
            "format": {"type": "text"},
            "verbosity": "medium",
        },
        "tool_choice": req.get("tool_choice", "auto"),
        "tools": req.get("tools") or [],
        "top_logprobs": req.get("top_logprobs", 0),
        "top_p": req.get("top_p", 1.0),
        "truncation": req.get("truncation", "disabled"),
        "usage": None,
        "user": req.get("user"),
        "metadata": req.get("metadata") or {},
    }


@dataclass(slots=True)
class Rendered:
    """A plan with ids assigned: the final output items, in order, plus their ids."""

    output: list[JSON] = field(default_factory=list)
    reasoning_id: str = ""
    item_id: str = ""
    call_id: str = ""


def render_output(plan: Plan) -> Rendered:
    """Assign ids and build the final (``*.done``-state) output items of ``plan``."""
    out = Rendered()
    status = "incomplete" if plan.incomplete else "completed"
    if plan.reasoning_tokens:
        out.reasoning_id = IDS.new("rs")
        summary = [{"type": "summary_text", "text": plan.reasoning_summary}] if plan.reasoning_summary else []
        item: JSON = {"id": out.reasoning_id, "type": "reasoning", "summary": summary}
        if plan.encrypted_reasoning:
            item["encrypted_content"] = _ENCRYPTED_REASONING
        out.output.append(item)
    joined = "".join(plan.pieces)
    if plan.kind == "compaction":
        out.item_id = IDS.new("cmp")
        sealed = base64.b64encode(orjson.dumps({"compacted": joined})).decode()
        out.output.append({"id": out.item_id, "type": "compaction", "encrypted_content": sealed})
    elif plan.kind == "function_call":
        out.item_id, out.call_id = IDS.new("fc"), IDS.new("call")
        out.output.append(
            {
                "id": out.item_id,
                "type": "function_call",
                "status": status,
                "arguments": joined,
                "call_id": out.call_id,
                "name": plan.tool_name,
            }
        )
    else:
        out.item_id = IDS.new("msg")
        out.output.append(
            {
                "id": out.item_id,
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": [{"type": "output_text", "text": joined, "annotations": [], "logprobs": []}],
            }
        )
    return out


def final_response(response: JSON, plan: Plan, rendered: Rendered, now: int, usage: JSON | None) -> JSON:
    """The finished response object: ``completed``, or ``incomplete`` when ``max_output_tokens`` cut it."""
    final = {**response, "status": "completed", "completed_at": now, "output": rendered.output, "usage": usage}
    if plan.incomplete:
        final.update(status="incomplete", completed_at=None, incomplete_details={"reason": "max_output_tokens"})
    return final


def sse_frame(event: JSON) -> bytes:
    """One SSE frame: ``event: <type>\\ndata: <json>\\n\\n`` (orjson never emits newlines)."""
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def stream_events(plan: Plan, rendered: Rendered, response: JSON, final: JSON) -> Iterator[JSON]:
    """The events of a stream, without ``sequence_number`` (the caller numbers them from 0).

    ``response`` is the in-progress snapshot (``output: []``, ``usage: null``); ``final`` is the
    finished response object. The terminal event is ``response.completed`` or ``response.incomplete``.
    """
    yield {"type": "response.created", "response": response}
    yield {"type": "response.in_progress", "response": response}
    index = 0
    if plan.reasoning_tokens:
        rid = rendered.reasoning_id
        yield {"type": "response.output_item.added", "output_index": 0, "item": {**rendered.output[0], "summary": []}}
        if plan.reasoning_summary:
            base = {"item_id": rid, "output_index": 0, "summary_index": 0}
            yield {
                "type": "response.reasoning_summary_part.added",
                **base,
                "part": {"type": "summary_text", "text": ""},
            }
            for piece in word_pieces(plan.reasoning_summary):
                yield {"type": "response.reasoning_summary_text.delta", **base, "delta": piece}
            yield {"type": "response.reasoning_summary_text.done", **base, "text": plan.reasoning_summary}
            part = {"type": "summary_text", "text": plan.reasoning_summary}
            yield {"type": "response.reasoning_summary_part.done", **base, "part": part}
        yield {"type": "response.output_item.done", "output_index": 0, "item": rendered.output[0]}
        index = 1
    item = rendered.output[index]
    item_id = rendered.item_id
    if plan.kind == "compaction":
        yield {"type": "response.output_item.added", "output_index": index, "item": item}
    elif plan.kind == "function_call":
        added_call = {**item, "status": "in_progress", "arguments": ""}
        yield {"type": "response.output_item.added", "output_index": index, "item": added_call}
        for piece in plan.pieces:
            yield {
                "type": "response.function_call_arguments.delta",
                "item_id": item_id,
                "output_index": index,
                "delta": piece,
            }
        yield {
            "type": "response.function_call_arguments.done",
            "item_id": item_id,
            "output_index": index,
            "name": plan.tool_name,
            "arguments": item["arguments"],
        }
    else:
        added = {**item, "status": "in_progress", "content": []}
        yield {"type": "response.output_item.added", "output_index": index, "item": added}
        loc = {"item_id": item_id, "output_index": index, "content_index": 0}
        empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield {"type": "response.content_part.added", **loc, "part": empty_part}
        for piece in plan.pieces:
            yield {"type": "response.output_text.delta", **loc, "delta": piece, "logprobs": []}
        part = item["content"][0]
        yield {"type": "response.output_text.done", **loc, "text": part["text"], "logprobs": []}
        yield {"type": "response.content_part.done", **loc, "part": part}
    yield {"type": "response.output_item.done", "output_index": index, "item": item}
    yield {"type": "response.incomplete" if plan.incomplete else "response.completed", "response": final}
