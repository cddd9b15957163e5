"""The data plane: the ASGI view behind /v1/* (mounted by gateway/asgi.py).

A plain ASGI callable rather than channels' AsyncHttpConsumer: the consumer base
dispatches messages one at a time, so while a stream is being relayed it could not
see the client's ``http.disconnect``, and it sets up a channel-layer inbox per request.
This view reads ``receive`` itself and touches no database per request: keys and
accounts come from the in-memory snapshot (gateway/state.py), usage leaves through
the meter (gateway/metering.py).

Request path: authenticate -> read body (size limit) -> parse -> validate (seed 004)
-> model access -> pick an account -> sanitize -> forward -> relay -> meter.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import os
import random
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from django.conf import settings

from gateway.asgi_io import ClientGone, Receive, Scope, Send, header, read_body, send_error, send_json
from gateway.errors import INVALID_REQUEST, SERVER, GatewayError
from gateway.relay import SseRelay, usage_fields
from gateway.runtime import Runtime, get_runtime, shutdown_runtime
from gateway.sanitize import sanitize_for_upstream
from gateway.state import AccountInfo, KeyInfo, ModelRoute, Snapshot
from gateway.upstream import UpstreamError, UpstreamStream
from gateway.validation import validate_request
from tenancy.keys import key_digest, key_prefix

logger = logging.getLogger(__name__)

# Upstream headers worth relaying to the client on an error answer.
_RELAYED_ERROR_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def _unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, type=INVALID_REQUEST, code="invalid_api_key")


def authenticate(scope: Scope, snapshot: Snapshot) -> KeyInfo:
    """Resolve the bearer key of a request against the snapshot, or raise a 401."""
    value = header(scope, b"authorization")
    if value is None:
        raise _unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
    if value[:7].lower() != b"bearer ":
        raise _unauthorized("The Authorization header must be 'Bearer YOUR_KEY'.")
    token = value[7:].strip().decode("latin-1")
    prefix = key_prefix(token)
    info = snapshot.keys.get(prefix) if prefix else None
    if info is None or not hmac.compare_digest(key_digest(token), info.digest):
        # Never echo the key: not even a part of it.
        raise _unauthorized("Incorrect API key provided.")
    if info.expires_at is not None and time.time() >= info.expires_at:
        raise _unauthorized("This API key has expired.")
    return info


def resolve_route(snapshot: Snapshot, key: KeyInfo, model: str) -> ModelRoute:
    """The accounts that may serve ``model`` for ``key``: 403, 404 or 503 otherwise."""
    if key.allowed_models is not None and model not in key.allowed_models:
        raise GatewayError(
            403, f"This API key does not have access to model '{model}'", type=INVALID_REQUEST, code="model_not_allowed"
        )
    route = snapshot.routes.get(model)
    if route is None:
        if model in snapshot.known_models:
            raise GatewayError(
                503, f"No upstream account is available for model '{model}'.", type=SERVER, code="no_accounts"
            )
        raise GatewayError(
            404,
            f"The model '{model}' does not exist or you do not have access to it.",
            type=INVALID_REQUEST,
            code="model_not_found",
        )
    return route


def pick_account(route: ModelRoute) -> AccountInfo:
    """Weighted random choice (issue 4 replaces this with the pool's strategy)."""
    if len(route.accounts) == 1:
        return route.accounts[0]
    return random.choices(route.accounts, cum_weights=route.cum_weights)[0]


def upstream_headers(account: AccountInfo, stream: bool) -> httpx.Headers:
    """The upstream request headers: one shared, read-only object per (credential, stream)."""
    return _upstream_headers(account.credential, stream)


@functools.lru_cache(maxsize=1024)
def _upstream_headers(credential: str | None, stream: bool) -> httpx.Headers:
    # Built once: constructing httpx.Headers per request was a measurable share of the request cost.
    headers = {"content-type": "application/json", "accept": "text/event-stream" if stream else "application/json"}
    if credential:
        headers["authorization"] = f"Bearer {credential}"
    return httpx.Headers(headers)


class Exchange:
    """The bookkeeping of one request: who, what, which account, and its usage record."""

    __slots__ = ("account", "key", "model", "request_id", "rid", "started", "stream")

    def __init__(self, request_id: str, started: float) -> None:
        self.request_id = request_id
        self.rid = request_id.encode()
        self.started = started
        self.key: KeyInfo | None = None
        self.model = ""
        self.stream = False
        self.account: AccountInfo | None = None

    def record(
        self,
        runtime: Runtime,
        status: int,
        outcome: str,
        usage: dict[str, int | None] | None = None,
        *,
        response_id: str = "",
        ttfb_ms: float | None = None,
    ) -> None:
        if self.key is None:
            return  # unauthenticated requests belong to no tenant
        event: dict[str, Any] = {
            "request_id": self.request_id,
            "tenant_id": self.key.tenant_id,
            "api_key_id": self.key.key_id,
            "account_id": self.account.account_id if self.account else None,
            "model": self.model,
            "status_code": status,
            "outcome": outcome,
            "stream": self.stream,
            "response_id": response_id,
            "latency_ms": (time.monotonic() - self.started) * 1000,
            "ttfb_ms": ttfb_ms,
            "created_at": datetime.now(UTC),
        }
        event.update(usage if usage is not None else usage_fields(None))
        runtime.meter.record(event)


class GatewayApp:
    """ASGI application for /v1/* and the lifespan protocol."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        exchange = Exchange("req_" + os.urandom(12).hex(), time.monotonic())
        runtime = get_runtime()
        path = scope["path"]
        method = scope["method"]
        try:
            if path == "/v1/responses":
                _allow(method, "POST", path)
                await self.responses(scope, receive, send, runtime, exchange)
            elif path == "/v1/models" or path.startswith("/v1/models/"):
                _allow(method, "GET", path)
                await self.models(scope, send, runtime, exchange, path[len("/v1/models/") :])
            elif path.startswith(("/v1/responses/", "/v1/conversations")):
                raise GatewayError(
                    501,
                    "Stored responses and conversations are not available on this gateway yet.",
                    type=INVALID_REQUEST,
                    code="not_implemented",
                )
            else:
                raise GatewayError(404, f"Invalid URL ({method} {path})", type=INVALID_REQUEST, code="not_found")
        except GatewayError as error:
            # Once an account was picked the request went upstream: a failure is the upstream's.
            exchange.record(runtime, error.status, "upstream_error" if exchange.account else "rejected")
            await send_error(send, error, exchange.rid)
        except ClientGone:
            return

    async def models(self, scope: Scope, send: Send, runtime: Runtime, exchange: Exchange, model_id: str) -> None:
        snapshot = await runtime.config.current()
        key = authenticate(scope, snapshot)
        visible = [
            {"id": model, "object": "model", "created": route.created, "owned_by": route.owned_by}
            for model, route in sorted(snapshot.routes.items())
            if key.allowed_models is None or model in key.allowed_models
        ]
        if not model_id:
            await send_json(send, 200, orjson.dumps({"object": "list", "data": visible}), exchange.rid)
            return
        for entry in visible:
            if entry["id"] == model_id:
                await send_json(send, 200, orjson.dumps(entry), exchange.rid)
                return
        raise GatewayError(
            404, f"The model '{model_id}' does not exist or you do not have access to it.", code="model_not_found"
        )

    async def responses(self, scope: Scope, receive: Receive, send: Send, runtime: Runtime, ex: Exchange) -> None:
        snapshot = await runtime.config.current()
        ex.key = authenticate(scope, snapshot)
        raw = await read_body(scope, receive, settings.GATEWAY_MAX_BODY_BYTES)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise GatewayError(
                400,
                "We could not parse the JSON body of your request. Send a JSON object as the body.",
                code="invalid_json",
            ) from None
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            ex.model = body["model"]
        request = validate_request(body)
        ex.stream = bool(request.get("stream"))
        route = resolve_route(snapshot, ex.key, ex.model)
        if request.get("conversation") is not None:
            raise GatewayError(
                501,
                "Stored conversations are not implemented on this gateway yet; send the full context in 'input'.",
                code="not_implemented",
                param="conversation",
            )
        account = ex.account = pick_account(route)
        payload = orjson.dumps(sanitize_for_upstream(request, account.strip_fields))
        headers = upstream_headers(account, ex.stream)
        try:
            upstream = await runtime.upstream.open(account.responses_url, headers, payload)
        except UpstreamError as exc:
            raise _upstream_failed(str(exc)) from None
        if (
            ex.stream
            and upstream.status == 200
            and upstream.headers.get("content-type", "").startswith("text/event-stream")
        ):
            await self._relay_stream(receive, send, runtime, ex, upstream)
            return
        try:
            content = await upstream.read()
        except UpstreamError as exc:
            raise _upstream_failed(str(exc)) from None
        finally:
            await upstream.aclose()
        await self._relay_reply(send, runtime, ex, upstream, content)

    async def _relay_reply(
        self, send: Send, runtime: Runtime, ex: Exchange, upstream: UpstreamStream, content: bytes
    ) -> None:
        status = upstream.status
        if status >= 500:
            raise _upstream_failed(f"the upstream answered {status}")
        extra = [
            (name.encode(), upstream.headers[name].encode())
            for name in _RELAYED_ERROR_HEADERS
            if name in upstream.headers
        ]
        if status >= 400:
            # The upstream's own envelope tells the client what it got wrong.
            ex.record(runtime, status, "upstream_rejected")
            await send_json(send, status, content, ex.rid, extra)
            return
        try:
            parsed = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise _upstream_failed("the upstream answered with malformed JSON") from None
        response = parsed if isinstance(parsed, dict) else {}
        await send_json(send, status, content, ex.rid)
        ex.record(
            runtime,
            status,
            str(response.get("status") or "completed"),
            usage_fields(response.get("usage")),
            response_id=str(response.get("id") or ""),
            ttfb_ms=(time.monotonic() - ex.started) * 1000,
        )

    async def _relay_stream(
        self, receive: Receive, send: Send, runtime: Runtime, ex: Exchange, upstream: UpstreamStream
    ) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, (b"x-request-id", ex.rid)]}
        )
        entry = runtime.keepalive.register(send)
        relay = SseRelay(send, entry, ex.started)
        task = asyncio.current_task()
        gone = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, task, gone))
        outcome: str
        tail = b""
        try:
            await relay.run(upstream)
            if relay.terminal is None:
                outcome = "upstream_error"
                tail = relay.failure_frames(
                    "upstream_error",
                    "The upstream closed the stream before the response completed.",
                    model=ex.model,
                    request_id=ex.request_id,
                )
            else:
                outcome = relay.terminal
        except UpstreamError as exc:
            outcome = "upstream_error"
            tail = relay.failure_frames(
                "upstream_error", f"The upstream stream failed: {exc}.", model=ex.model, request_id=ex.request_id
            )
        except asyncio.CancelledError:
            if not gone.is_set() or task is None:
                raise
            task.uncancel()
            outcome = "client_disconnected"
        finally:
            watcher.cancel()
            runtime.keepalive.unregister(entry)
            await upstream.aclose()
        if outcome != "client_disconnected":
            try:
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            except Exception:
                outcome = "client_disconnected"
        ex.record(runtime, 200, outcome, relay.usage, response_id=relay.response_id, ttfb_ms=relay.ttfb_ms)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await shutdown_runtime()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any] | None, gone: asyncio.Event) -> None:
    """Cancel the relaying task as soon as the client goes away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            if task is not None:
                task.cancel()
            return


def _allow(method: str, allowed: str, path: str) -> None:
    if method != allowed:
        raise GatewayError(405, f"Method {method} is not allowed on {path}; use {allowed}.", code="method_not_allowed")


def _upstream_failed(detail: str) -> GatewayError:
    return GatewayError(502, f"The upstream request failed: {detail}.", type=SERVER, code="upstream_error")


gateway_app = GatewayApp()
