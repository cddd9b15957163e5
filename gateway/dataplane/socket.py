"""``/v1/responses`` over a WebSocket (what the Codex CLI opens with ``supports_websockets``).

A Channels consumer (:class:`ResponsesSocket`, routed by gateway/conf/asgi.py) that holds one
client connection and serves its responses one after another. Contract:

- **Upgrade**: the bearer key is checked before the socket is accepted, exactly as for HTTP
  (:func:`gateway.dataplane.auth.authenticate`). A refused key never gets a socket: the
  upgrade is answered with the HTTP status and OpenAI error envelope (the ASGI
  ``websocket.http.response`` extension; a server without it closes the handshake with 403).
- **Messages**: a text message ``{"type": "response.create", ...body}`` asks for one
  response (the body's fields at the top level, as the Codex CLI sends them). Each one
  is served as an in-process ``POST /v1/responses`` with ``stream: true`` through the
  data plane's own app (:data:`gateway.dataplane.app.gateway_app`), so it gets the same
  validation, sanitization, policy, limits (the key's concurrency counts in-flight
  socket responses), account selection, failover and metering as over HTTP. Its SSE
  events go back as text messages carrying each event's JSON unchanged, in order; keep-alive
  comments are not forwarded (the server's WebSocket pings keep the connection alive).
  ``response.processed`` is accepted and ignored; any other type gets an ``error`` event.
- **Continuation**: ``previous_response_id`` naming a response completed earlier on this
  connection, with ``store`` false, is served by sending the upstream that response's
  whole context (its input and output items, kept in memory for the connection and never
  stored) followed by the new input. Any other ``previous_response_id`` gets
  ``previous_response_not_found`` (404). The last :data:`KEPT_CONTEXTS` contexts are kept,
  within ``GATEWAY_WS_CONTEXT_BYTES``.
- **Errors** are ``error`` events: ``{"type": "error", "status": S, "error": {envelope},
  "headers": {...}}`` (the shape the Codex CLI maps to an HTTP error); the connection
  survives them.
- **Closing**: ``GATEWAY_WS_IDLE_SECONDS`` without a message closes the socket (code 1000,
  reason ``idle timeout``); after ``GATEWAY_WS_MAX_SECONDS`` the connection gets an ``error``
  event with code ``websocket_connection_limit_reached`` once no response is running
  and is closed (code 1000, reason ``connection lifetime reached``); a client reconnects.
  A client that goes away cancels the running response's upstream request, which is
  metered as a client disconnect, as over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any

import orjson
from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from gateway.contract.errors import INVALID_REQUEST, GatewayError
from gateway.dataplane.auth import authenticate
from gateway.dataplane.runtime import Runtime

logger = logging.getLogger(__name__)

# Contexts of completed responses a connection keeps for continuation (the newest ones).
KEPT_CONTEXTS = 8
# Response events that end a response (the last event of its stream).
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Headers of a refused response worth passing on in its error event.
_ERROR_HEADERS = frozenset({b"retry-after", b"retry-after-ms", b"x-request-id", b"x-should-retry"})
_QUIET_TYPES = frozenset({"response.processed"})


class _Context:
    __slots__ = ("items", "size")

    def __init__(self, items: list[Any], size: int) -> None:
        self.items = items
        self.size = size


def error_event(status: int, error: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    """The ``error`` event of a failed response: HTTP status, OpenAI envelope, headers."""
    return orjson.dumps({"type": "error", "status": status, "error": error, "headers": headers or {}})


def _gateway_error_event(error: GatewayError) -> bytes:
    headers = {name.decode(): value.decode() for name, value in error.headers if name.lower() in _ERROR_HEADERS}
    return error_event(error.status, error.envelope()["error"], headers)


def _as_items(value: Any) -> list[Any]:
    """A request's ``input`` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    if isinstance(value, list):
        return value
    return []


class _Exchange:
    """The in-process HTTP exchange serving one ``response.create``: the request goes to the
    data plane app; its answer comes back as WebSocket messages."""

    def __init__(self, socket: ResponsesSocket, body: bytes) -> None:
        self.socket = socket
        self.body = body
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.sse = False
        self.buffer = b""
        self.error_body = b""
        self.terminal: dict[str, Any] | None = None
        self.sent_body = False

    async def receive(self) -> dict[str, Any]:
        if not self.sent_body:
            self.sent_body = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.socket.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = message.get("headers", [])
            self.sse = any(
                name == b"content-type" and value.startswith(b"text/event-stream") for name, value in self.headers
            )
            return
        body = message.get("body", b"")
        if not self.sse:
            self.error_body += body
            if not message.get("more_body", False):
                await self._send_error()
            return
        if body:
            self.buffer += body.replace(b"\r\n", b"\n") if b"\r" in body else body
            await self._flush_frames()

    async def _flush_frames(self) -> None:
        *frames, self.buffer = self.buffer.split(b"\n\n")
        for frame in frames:
            if frame.startswith(b"event: ") and frame.count(b"\n") == 1:
                # The common frame (``event: T`` then one ``data:`` line): no line list built.
                payload = frame[frame.index(b"\ndata:") + 6 :].lstrip(b" ") if b"\ndata:" in frame else b""
            else:
                data = [line[5:].lstrip(b" ") for line in frame.split(b"\n") if line.startswith(b"data:")]
                payload = data[0] if len(data) == 1 else b"\n".join(data)
            if not payload or payload == b"[DONE]":
                continue  # a comment (keep-alive) or an event without data
            await self.socket.send_text(payload)
            head = payload[:64]
            if b'"response.completed"' in head or b'"response.incomplete"' in head or b'"response.failed"' in head:
                self._note_terminal(payload)

    def _note_terminal(self, payload: bytes) -> None:
        """Keep the terminal event (parsed: its output is the context of a continuation)."""
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if isinstance(event, dict) and event.get("type") in _TERMINAL:
            self.terminal = event

    async def _send_error(self) -> None:
        try:
            envelope = orjson.loads(self.error_body)
            error = envelope["error"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            error = {"message": "The gateway could not serve this response.", "type": "server_error"}
            error.update(param=None, code="server_error")
        headers = {name.decode(): value.decode() for name, value in self.headers if name.lower() in _ERROR_HEADERS}
        await self.socket.send_text(error_event(self.status, error, headers))


class ResponsesSocket(AsyncWebsocketConsumer):
    """One client's socket on ``/v1/responses`` (see the module doc for the contract)."""

    # No channel layer: a socket talks to nobody but its client (a Redis layer would cost
    # every connection its own inbox and a blocking read loop).
    channel_layer_alias = "responses-socket-has-no-layer"

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Channels' dispatch without its per-message ``close_old_connections`` (a thread hop
        per message: this consumer touches no database connection of its own)."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def websocket_connect(self, message: dict[str, Any]) -> None:
        from gateway.dataplane.app import gateway_app  # the app imports nothing of this module

        self.app = gateway_app
        self.gone = asyncio.Event()
        self.queue: asyncio.Queue[bytes | str] = asyncio.Queue()
        self.contexts: OrderedDict[str, _Context] = OrderedDict()
        self.opened = time.monotonic()
        self.worker: asyncio.Task[None] | None = None
        try:
            runtime = await gateway_app.ready_runtime()
            await _authenticate(self.scope, runtime)
        except GatewayError as error:
            await self._refuse(error)
            raise StopConsumer from None
        await self.accept()
        self.worker = asyncio.create_task(self._serve_messages())

    async def _refuse(self, error: GatewayError) -> None:
        """Answer the upgrade with ``error`` (status and envelope) instead of a socket."""
        if "websocket.http.response" in self.scope.get("extensions", {}):
            body = error.body()
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
            await self.base_send({"type": "websocket.http.response.start", "status": error.status, "headers": headers})
            await self.base_send({"type": "websocket.http.response.body", "body": body})
        else:
            await self.close()

    async def websocket_receive(self, message: dict[str, Any]) -> None:
        text = message.get("text")
        if text is None:
            await self.send_text(
                error_event(400, _invalid("Send each request as a JSON text message, not binary.", "type"))
            )
            return
        self.queue.put_nowait(text)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        """The client left: a running response is cancelled (and metered), then the consumer stops."""
        self.gone.set()
        worker = getattr(self, "worker", None)
        if worker is not None:
            if not worker.done():
                # Let the running response see its client leave and record its usage.
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(worker), 10)
            worker.cancel()
        raise StopConsumer

    async def send_text(self, payload: bytes | str) -> None:
        """Send one text message; a client already gone is not an error."""
        if self.gone.is_set():
            return
        text = payload.decode() if isinstance(payload, bytes) else payload
        try:
            await self.base_send({"type": "websocket.send", "text": text})
        except Exception:  # the connection closed under us (the disconnect message follows)
            self.gone.set()

    async def _serve_messages(self) -> None:
        idle = settings.GATEWAY_WS_IDLE_SECONDS
        lifetime = settings.GATEWAY_WS_MAX_SECONDS
        while not self.gone.is_set():
            left = self.opened + lifetime - time.monotonic()
            if left <= 0:
                await self._close_for_lifetime()
                return
            try:
                text = await asyncio.wait_for(self.queue.get(), min(idle, left))
            except TimeoutError:
                # Which bound ended the wait, not the clock read after it: uvloop's timers have
                # millisecond resolution and may fire up to a millisecond early.
                if left <= idle:
                    await self._close_for_lifetime()
                else:
                    await self._close(1000, "idle timeout")
                return
            try:
                await self._serve_one(text)
            except Exception:
                logger.exception("a WebSocket response failed")
                await self.send_text(
                    error_event(
                        500,
                        {
                            "message": "The gateway had an internal error while serving this request.",
                            "type": "server_error",
                            "param": None,
                            "code": "server_error",
                        },
                    )
                )

    async def _close_for_lifetime(self) -> None:
        message = (
            f"Responses websocket connection limit reached ({settings.GATEWAY_WS_MAX_SECONDS:g} seconds). "
            "Create a new websocket connection to continue."
        )
        await self.send_text(error_event(400, _invalid(message, None, "websocket_connection_limit_reached")))
        await self._close(1000, "connection lifetime reached")

    async def _close(self, code: int, reason: str) -> None:
        if not self.gone.is_set():
            with contextlib.suppress(Exception):
                await self.base_send({"type": "websocket.close", "code": code, "reason": reason})
        self.gone.set()

    async def _serve_one(self, text: str | bytes) -> None:
        try:
            message = orjson.loads(text)
        except orjson.JSONDecodeError:
            message = None
        if not isinstance(message, dict):
            await self.send_text(
                error_event(
                    400,
                    _invalid("We could not parse the JSON of your message; send a JSON object.", None, "invalid_json"),
                )
            )
            return
        kind = message.get("type")
        if kind in _QUIET_TYPES:
            return
        if kind != "response.create":
            await self.send_text(
                error_event(
                    400,
                    _invalid(
                        f"Unknown message type {kind!r}: this socket accepts 'response.create' and "
                        "'response.processed'.",
                        "type",
                        "unknown_message_type",
                    ),
                )
            )
            return
        body = {name: value for name, value in message.items() if name != "type"}
        try:
            self._continue(body)
        except GatewayError as error:
            await self.send_text(_gateway_error_event(error))
            return
        body["stream"] = True
        raw = orjson.dumps(body)
        exchange = _Exchange(self, raw)
        await self.app(self._http_scope(len(raw)), exchange.receive, exchange.send)
        self._remember(body, exchange.terminal, len(raw))

    def _continue(self, body: dict[str, Any]) -> None:
        """Resolve ``previous_response_id`` against this connection's contexts (in place)."""
        previous = body.get("previous_response_id")
        if previous is None:
            return
        context = self.contexts.get(previous) if isinstance(previous, str) else None
        if context is None or body.get("store") is True:
            raise GatewayError(
                404,
                f"Previous response with id '{previous}' not found. On this gateway a WebSocket "
                "can continue only from a response created earlier on the same connection, with 'store': false.",
                code="previous_response_not_found",
                param="previous_response_id",
            )
        del body["previous_response_id"]
        body["input"] = [*context.items, *_as_items(body.get("input"))]

    def _remember(self, body: dict[str, Any], terminal: dict[str, Any] | None, size: int) -> None:
        """Keep a finished response's context (its input and output items) for continuation."""
        if terminal is None or terminal.get("type") == "response.failed":
            return
        response = terminal.get("response")
        if not isinstance(response, dict) or not isinstance(response.get("id"), str):
            return
        output = response.get("output")
        if not isinstance(output, list):
            output = []
        items = [*_as_items(body.get("input")), *output]
        self.contexts[response["id"]] = _Context(items, size + len(orjson.dumps(output)))
        budget = settings.GATEWAY_WS_CONTEXT_BYTES
        while self.contexts and (
            len(self.contexts) > KEPT_CONTEXTS or sum(c.size for c in self.contexts.values()) > budget
        ):
            self.contexts.popitem(last=False)

    def _http_scope(self, length: int) -> dict[str, Any]:
        """The scope of the in-process ``POST /v1/responses`` serving one response."""
        headers = [
            (name, value)
            for name, value in self.scope["headers"]
            if name not in (b"content-length", b"content-type", b"upgrade", b"connection")
            and not name.startswith(b"sec-websocket-")
        ]
        headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % length)]
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "https" if self.scope.get("scheme") == "wss" else "http",
            "path": "/v1/responses",
            "raw_path": b"/v1/responses",
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": self.scope.get("client"),
            "server": self.scope.get("server"),
            "state": {},
        }


async def _authenticate(scope: dict[str, Any], runtime: Runtime) -> None:
    """The key check of the upgrade, on the current configuration as for HTTP: a refusal is
    checked once more against a newer configuration token (a key created on another replica)."""
    for retry in (False, True):
        snapshot = await runtime.config.current()
        try:
            await authenticate(scope, runtime.config.keys)
            return
        except GatewayError as error:
            if retry or runtime.redis is None or error.status not in (401, 503):
                raise
            if await runtime.fresh_token() == snapshot.token:
                raise


def _invalid(message: str, param: str | None, code: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": INVALID_REQUEST, "param": param, "code": code}
