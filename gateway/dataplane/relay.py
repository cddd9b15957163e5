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

from accounts.upstream.client import UpstreamProtocolError, UpstreamTooLarge
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


# The largest partial frame kept while waiting for its end (GATEWAY_UPSTREAM_MAX_FRAME_BYTES).
DEFAULT_MAX_FRAME = 16 * 1024 * 1024

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

    def __init__(self, send: Send, started: float, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._send = send
        self._started = started
        self.entry: list[Any] = [send, time.monotonic()]
        self.ttfb_ms: float | None = None
        self.terminal: str | None = None
        self.usage: dict[str, int | None] = unknown_usage()
        self.response_id = ""
        self.failure_code = ""
        self.bad_frame = -1
        self._created: dict[str, Any] | None = None
        self._last_frame = b""
        self._buffer = bytearray()
        self._cr = False  # the last chunk ended with a CR (its LF may start the next one)
        self._max_frame = max_frame
        self.on_event: Callable[[], object] | None = None  # called when an event (not a comment) arrives
        self._held: list[bytes] = []
        self._pending: asyncio.Future[bytes] | None = None

    def _split(self, chunk: bytes) -> bytes | None:
        """Add ``chunk``; return the complete frames it finished, if any.

        Linear in the bytes received: each byte is copied into the buffer once and searched
        for a frame boundary once (the search starts where the last one stopped), however
        the upstream cuts its chunks. A partial frame over ``max_frame`` bytes raises
        UpstreamTooLarge. CRLF line ends are turned into LF, also across chunks.
        """
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk = chunk[:-1]
                self._cr = True
            chunk = chunk.replace(b"\r\n", b"\n")
        buffer = self._buffer
        if not buffer:
            cut = chunk.rfind(b"\n\n")
            if cut < 0:
                buffer += chunk
                self._check_frame_size()
                return None
            cut += 2
            buffer += chunk[cut:]
            self._check_frame_size()
            return chunk[:cut]
        start = len(buffer) - 1  # a boundary may straddle the old and the new bytes
        buffer += chunk
        cut = buffer.rfind(b"\n\n", start)
        if cut < 0:
            self._check_frame_size()
            return None
        cut += 2
        out = bytes(buffer[:cut])
        del buffer[:cut]
        self._check_frame_size()
        return out

    def _check_frame_size(self) -> None:
        if len(self._buffer) > self._max_frame:
            raise UpstreamTooLarge(f"the upstream sent an event over {self._max_frame} bytes")

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
            try:
                self._inspect(out)
            except UpstreamProtocolError:
                if self.bad_frame > 0:  # the frames before the malformed one are fine
                    await self._forward(out[: self.bad_frame])
                raise
            await self._forward(out)

    async def _forward(self, out: bytes) -> None:
        await self._send({"type": "http.response.body", "body": out, "more_body": True})
        self.entry[1] = now = time.monotonic()
        if self.ttfb_ms is None:
            self.ttfb_ms = (now - self._started) * 1000

    def _inspect(self, out: bytes, *, holding: bool = False) -> str:
        """Note the frames of ``out``; while holding, say whether the stream proved itself.

        A terminal event whose data is not a JSON object with a ``response`` object breaks
        the contract clients rely on: UpstreamProtocolError (``bad_frame`` is then the
        offset of that frame in ``out``: what comes before it may still be relayed).
        """
        verdict = HOLD
        offset = 0
        events = False
        for frame in out.split(b"\n\n"):
            at, offset = offset, offset + len(frame) + 2
            if not frame or frame.startswith(b":"):
                continue
            events = True
            kind = _frame_type(frame)
            if kind in _TERMINAL:
                data = _frame_json(frame)
                if not isinstance(data, dict) or not isinstance(data.get("response"), dict):
                    self.bad_frame = at
                    raise UpstreamProtocolError(f"the upstream sent a malformed {kind.decode()} event")
            self._last_frame = frame
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
        if events and self.on_event is not None:
            self.on_event()
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
