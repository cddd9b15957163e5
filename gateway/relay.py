"""Relaying upstream answers to the client, and reading usage out of them.

Streams are relayed frame by frame as they arrive: every complete SSE frame in an
upstream chunk is sent at once, a partial frame waits for its end (so a keep-alive
comment or a synthesized failure can never split a frame). Only the frames that
matter are parsed: ``response.created`` (for the response id) and the terminal
events (for status and usage).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from gateway.upstream import UpstreamStream

Send = Callable[[dict[str, Any]], Awaitable[None]]

TOKEN_FIELDS = (
    "input_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
)
_UNKNOWN_USAGE: dict[str, int | None] = dict.fromkeys(TOKEN_FIELDS)
_TERMINAL = {
    b"response.completed": "completed",
    b"response.incomplete": "incomplete",
    b"response.failed": "failed",
}
_CREATED = b"response.created"


def _count(value: object) -> int | None:
    # bool is an int subclass; a token count is never a bool.
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def usage_fields(usage: object) -> dict[str, int | None]:
    """Map a Responses ``usage`` object to usage-record fields; unreported values stay None."""
    if not isinstance(usage, dict):
        return dict(_UNKNOWN_USAGE)
    inp = usage.get("input_tokens_details")
    out = usage.get("output_tokens_details")
    inp = inp if isinstance(inp, dict) else {}
    out = out if isinstance(out, dict) else {}
    return {
        "input_tokens": _count(usage.get("input_tokens")),
        "cached_tokens": _count(inp.get("cached_tokens")),
        "cache_write_tokens": _count(inp.get("cache_write_tokens")),
        "output_tokens": _count(usage.get("output_tokens")),
        "reasoning_tokens": _count(out.get("reasoning_tokens")),
        "total_tokens": _count(usage.get("total_tokens")),
    }


def _frame_type(frame: bytes) -> bytes | None:
    """The event type of one SSE frame: its ``event:`` line, else the JSON ``type``."""
    if frame.startswith(b"event:"):
        end = frame.find(b"\n")
        return frame[6 : end if end >= 0 else None].strip()
    start = frame.find(b'"type":')
    if start < 0:
        return None
    start = frame.find(b'"', start + 7)
    end = frame.find(b'"', start + 1)
    return frame[start + 1 : end] if start >= 0 and end > start else None


def _frame_json(frame: bytes) -> Any:
    lines = [line[5:].lstrip(b" ") for line in frame.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        return orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None


class SseRelay:
    """Relays one upstream SSE stream to the client and remembers what it saw.

    After :meth:`run` returns, ``terminal`` is the terminal status the upstream sent
    (None if the stream ended without one), ``usage`` its usage fields and
    ``response_id`` the upstream response id.
    """

    def __init__(self, send: Send, keepalive_entry: list[Any], started: float) -> None:
        self._send = send
        self._entry = keepalive_entry
        self._started = started
        self.ttfb_ms: float | None = None
        self.terminal: str | None = None
        self.usage: dict[str, int | None] = dict(_UNKNOWN_USAGE)
        self.response_id = ""
        self._created: dict[str, Any] | None = None
        self._last_frame = b""

    async def run(self, stream: UpstreamStream) -> None:
        """Relay until the upstream closes. Raises UpstreamError if the connection breaks."""
        buffer = b""
        async for chunk in stream.chunks():
            buffer = buffer + chunk if buffer else chunk
            if b"\r" in buffer:
                buffer = buffer.replace(b"\r\n", b"\n")
            cut = buffer.rfind(b"\n\n")
            if cut < 0:
                continue
            cut += 2
            out, buffer = buffer[:cut], buffer[cut:]
            self._inspect(out)
            await self._send({"type": "http.response.body", "body": out, "more_body": True})
            self._entry[1] = now = time.monotonic()
            if self.ttfb_ms is None:
                self.ttfb_ms = (now - self._started) * 1000

    def _inspect(self, out: bytes) -> None:
        frames = out.split(b"\n\n")
        for frame in frames:
            if not frame or frame.startswith(b":"):
                continue
            self._last_frame = frame
            kind = _frame_type(frame)
            if kind == _CREATED and self._created is None:
                data = _frame_json(frame)
                response = data.get("response") if isinstance(data, dict) else None
                if isinstance(response, dict):
                    self._created = response
                    self.response_id = str(response.get("id") or "")
            elif kind in _TERMINAL:
                self.terminal = _TERMINAL[kind]
                data = _frame_json(frame)
                response = data.get("response") if isinstance(data, dict) else None
                if isinstance(response, dict):
                    self.usage = usage_fields(response.get("usage"))
                    self.response_id = str(response.get("id") or self.response_id)

    def failure_frames(self, code: str, message: str, *, model: str, request_id: str) -> bytes:
        """An ``error`` event then ``response.failed``, numbered after the last relayed event.

        When the upstream failed before sending any event, a ``response.created`` goes first:
        clients (the SDK's stream helper) require it before any other event.
        """
        last = _frame_json(self._last_frame) if self._last_frame else None
        seq = last.get("sequence_number") if isinstance(last, dict) else None
        seq = seq + 1 if isinstance(seq, int) else 0
        created = b""
        if self._created is None and not self._last_frame:
            self._created = {
                "id": f"resp_{request_id}",
                "object": "response",
                "created_at": int(time.time()),
                "status": "in_progress",
                "model": model,
                "output": [],
                "usage": None,
                "error": None,
            }
            created = _sse(
                "response.created", {"type": "response.created", "sequence_number": seq, "response": self._created}
            )
            seq += 1
        response = (
            dict(self._created)
            if self._created
            else {
                "id": f"resp_{request_id}",
                "object": "response",
                "created_at": int(time.time()),
                "model": model,
                "output": [],
                "usage": None,
            }
        )
        response["status"] = "failed"
        response["error"] = {"code": code, "message": message}
        error = {"type": "error", "sequence_number": seq, "code": code, "message": message, "param": None}
        failed = {"type": "response.failed", "sequence_number": seq + 1, "response": response}
        return created + _sse("error", error) + _sse("response.failed", failed)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
