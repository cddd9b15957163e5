"""Relaying upstream answers to the client, and reading usage out of them.

Streams are relayed frame by frame as they arrive: every complete SSE frame in an
upstream chunk is sent at once, a partial frame waits for its end (so a keep-alive
comment or a synthesized failure can never split a frame). Only the frames that
matter are parsed: ``response.created`` (for the response id) and the terminal
events (for status and usage).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from tenancy.pricing import unknown_usage, usage_fields

Send = Callable[[dict[str, Any]], Awaitable[None]]

_TERMINAL = {
    b"response.completed": "completed",
    b"response.incomplete": "incomplete",
    b"response.failed": "failed",
}
_CREATED = b"response.created"


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


HOLD = "hold"
COMMIT = "commit"
RETRY = "retry"

# Lifecycle frames held back before real output; anything else commits the stream.
_PRELUDE = frozenset({b"response.created", b"response.in_progress", b"response.queued"})
_FAILURES = frozenset({b"error", b"response.failed"})
# Upstream failure codes worth another account; others (e.g. a refused prompt) are relayed.
_RETRYABLE_CODES = frozenset({"", "server_error", "rate_limit_exceeded", "internal_error", "overloaded", "timeout"})


class SseRelay:
    """Relays one upstream SSE stream to the client and remembers what it saw.

    :meth:`hold` reads the first frames without sending them, until real output (or a
    terminal event) shows the upstream is serving: a failure before that can still be
    retried on another account, invisibly. :meth:`run` then sends what was held and
    relays the rest. Afterwards ``terminal`` is the terminal status the upstream sent
    (None if the stream ended without one), ``usage`` its usage fields and
    ``response_id`` the upstream response id.
    """

    def __init__(self, send: Send, started: float) -> None:
        self._send = send
        self._started = started
        self.entry: list[Any] = [send, time.monotonic()]
        self.ttfb_ms: float | None = None
        self.terminal: str | None = None
        self.usage: dict[str, int | None] = unknown_usage()
        self.response_id = ""
        self.failure_code = ""
        self._created: dict[str, Any] | None = None
        self._last_frame = b""
        self._buffer = b""
        self._held: list[bytes] = []
        self._pending: asyncio.Future[bytes] | None = None

    def _split(self, chunk: bytes) -> bytes | None:
        """Add ``chunk``; return the complete frames it finished, if any."""
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        cut = buffer.rfind(b"\n\n")
        if cut < 0:
            self._buffer = buffer
            return None
        cut += 2
        self._buffer = buffer[cut:]
        return buffer[:cut]

    async def hold(self, chunks: AsyncIterator[bytes], seconds: float) -> str:
        """Read frames without sending them until the stream proves itself.

        Returns COMMIT once real output or a successful terminal event arrived, or when
        ``seconds`` passed (the client then gets the held frames and keep-alives);
        RETRY when the upstream failed (or ended) before any output. Raises
        UpstreamError if the connection broke.
        """
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            pending = self._pending or asyncio.ensure_future(chunks.__anext__())
            self._pending = pending
            if remaining <= 0:
                return COMMIT
            done, _ = await asyncio.wait((pending,), timeout=remaining)
            if not done:
                return COMMIT  # run() goes on waiting for the same chunk
            self._pending = None
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return RETRY
            out = self._split(chunk)
            if out is None:
                continue
            self._held.append(out)
            verdict = self._inspect(out, holding=True)
            if verdict != HOLD:
                return verdict

    async def run(self, chunks: AsyncIterator[bytes]) -> None:
        """Send what was held, then relay until the upstream closes (UpstreamError if it breaks)."""
        if self._held:
            await self._forward(b"".join(self._held))
            self._held = []
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                chunk = await pending
            except StopAsyncIteration:
                return
            await self._relay_chunk(chunk)
        async for chunk in chunks:
            await self._relay_chunk(chunk)

    def discard(self) -> None:
        """Drop a read still pending (the attempt is abandoned)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    async def _relay_chunk(self, chunk: bytes) -> None:
        out = self._split(chunk)
        if out is not None:
            self._inspect(out)
            await self._forward(out)

    async def _forward(self, out: bytes) -> None:
        await self._send({"type": "http.response.body", "body": out, "more_body": True})
        self.entry[1] = now = time.monotonic()
        if self.ttfb_ms is None:
            self.ttfb_ms = (now - self._started) * 1000

    def _inspect(self, out: bytes, *, holding: bool = False) -> str:
        """Note the frames of ``out``; while holding, say whether the stream proved itself."""
        verdict = HOLD
        for frame in out.split(b"\n\n"):
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
                    error = response.get("error")
                    if isinstance(error, dict):
                        self.failure_code = str(error.get("code") or "")
            elif kind == b"error":
                data = _frame_json(frame)
                self.failure_code = str((data.get("code") if isinstance(data, dict) else "") or "")
            if holding and verdict == HOLD and kind not in _PRELUDE:
                retryable = kind in _FAILURES and self.failure_code in _RETRYABLE_CODES
                verdict = RETRY if retryable else COMMIT
        return verdict

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
