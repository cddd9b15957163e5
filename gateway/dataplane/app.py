"""The data plane: the ASGI view behind /v1/* (mounted by gateway/asgi.py).

A plain ASGI callable rather than channels' AsyncHttpConsumer: the consumer base
dispatches messages one at a time, so while a stream is being relayed it could not
see the client's ``http.disconnect``, and it sets up a channel-layer inbox per request.
This view reads ``receive`` itself and touches no database per request: keys, limits,
routes and prices come from the in-memory snapshot (gateway/state.py), usage leaves
through the meter.

``POST /v1/responses``: authenticate -> read body (size limit) -> parse -> validate
(seed 004) -> key policy -> model access and attempt plan -> admission (every limit and
budget, one atomic step: the single choke point) -> dispatch with failover
(gateway/dispatch.py) -> settle the reservation -> meter.
"""

from __future__ import annotations

import hmac
import os
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from django.conf import settings

from accounts.routing.routes import FallbackNotAllowed, attempt_plan, fallback_models
from gateway.config.snapshot import KeyInfo, Snapshot
from gateway.contract.errors import INVALID_REQUEST, SERVER, GatewayError
from gateway.contract.policy import apply_policy
from gateway.contract.validation import validate_request
from gateway.dataplane.asgi_io import ClientGone, Receive, Scope, Send, header, read_body, send_error, send_json
from gateway.dataplane.dispatch import Dispatcher, Failed
from gateway.dataplane.relay import usage_fields
from gateway.dataplane.runtime import Runtime, get_runtime, shutdown_runtime
from gateway.limits.engine import Decision, estimate_tokens, rejection_error
from tenancy.keys import key_digest, key_prefix
from tenancy.pricing import Price, cost_usd, estimate_cost_usd, usd_to_micros


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


def _not_allowed(model: str, param: str | None = None) -> GatewayError:
    return GatewayError(
        403, f"This API key does not have access to model '{model}'", code="model_not_allowed", param=param
    )


def plan_request(snapshot: Snapshot, key: KeyInfo, request: dict[str, Any]) -> list[tuple[str, int, str]]:
    """The (public model, pool, upstream model) attempts for a request: 403, 404 or 503 otherwise."""
    model = request["model"]
    if key.allowed_models is not None and model not in key.allowed_models:
        raise _not_allowed(model)
    try:
        extra = fallback_models(model, request.get("fallbacks"), key.allowed_models)
    except FallbackNotAllowed as exc:
        raise _not_allowed(exc.model, exc.param) from None
    plan = attempt_plan(model, extra, snapshot.routes)
    if plan:
        return plan
    if model in snapshot.known_models or any(name in snapshot.known_models for name in extra):
        raise GatewayError(
            503, f"No upstream account is available for model '{model}'.", type=SERVER, code="no_accounts"
        )
    raise GatewayError(
        404, f"The model '{model}' does not exist or you do not have access to it.", code="model_not_found"
    )


class Exchange:
    """The bookkeeping of one request: who, what, which accounts, and its usage record."""

    __slots__ = (
        "account",
        "attempts",
        "final",
        "headers",
        "key",
        "model",
        "price",
        "request_id",
        "rid",
        "started",
        "stream",
    )

    def __init__(self, request_id: str, started: float) -> None:
        self.request_id = request_id
        self.rid = request_id.encode()
        self.started = started
        self.key: KeyInfo | None = None
        self.model = ""
        self.stream = False
        self.account: Any = None
        self.price: Price | None = None
        self.attempts: list[dict[str, Any]] = []
        # (status, outcome, usage, response_id, ttfb_ms) once the request is answered.
        self.final: tuple[int, str, dict[str, int | None], str, float | None] | None = None
        self.headers: list[tuple[bytes, bytes]] = []

    @property
    def tenant_id(self) -> int:
        return self.key.tenant_id if self.key is not None else 0

    def note_attempt(self, account_id: int, outcome: str, status: int, usage: dict[str, int | None] | None) -> None:
        """A failed attempt: recorded with the request, its usage billed too."""
        self.attempts.append({"account_id": account_id, "outcome": outcome, "status": status, **(usage or {})})

    def finish(
        self,
        status: int,
        outcome: str,
        usage: dict[str, int | None] | None = None,
        *,
        response_id: str = "",
        ttfb_ms: float | None = None,
    ) -> None:
        self.final = (status, outcome, usage if usage is not None else usage_fields(None), response_id, ttfb_ms)

    def billed(self) -> tuple[int | None, Decimal | None]:
        """Tokens and cost of the final answer plus failed attempts; None when unknown."""
        usages = [attempt for attempt in self.attempts if attempt.get("total_tokens") is not None]
        if self.final is not None:
            usages.append(self.final[2])
        tokens: int | None = None
        cost: Decimal | None = None
        for usage in usages:
            if usage.get("total_tokens") is not None:
                tokens = (tokens or 0) + int(usage["total_tokens"])
            if self.price is not None:
                amount = cost_usd(usage, self.price)
                if amount is not None:
                    cost = (cost or Decimal(0)) + amount
        return tokens, cost

    def event(self, cost: Decimal | None) -> dict[str, Any]:
        assert self.key is not None
        status, outcome, usage, response_id, ttfb = self.final or (500, "failed", usage_fields(None), "", None)
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
            "ttfb_ms": ttfb,
            "created_at": datetime.now(UTC),
            "cost": str(cost) if cost is not None and self.final is not None and outcome != "rejected" else None,
            "price_version_id": self.price.id if self.price is not None else None,
            "attempts": self.attempts,
        }
        event.update(usage)
        return event


class GatewayApp:
    """ASGI application for /v1/* and the lifespan protocol."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        ex = Exchange("req_" + os.urandom(12).hex(), time.monotonic())
        runtime = get_runtime()
        path = scope["path"]
        method = scope["method"]
        try:
            if path == "/v1/responses":
                _allow(method, "POST", path)
                await self.responses(scope, receive, send, runtime, ex)
            elif path == "/v1/models" or path.startswith("/v1/models/"):
                _allow(method, "GET", path)
                await self.models(scope, send, runtime, ex, path[len("/v1/models/") :])
            elif path == "/v1/usage":
                _allow(method, "GET", path)
                from gateway.dataplane.usage_endpoint import usage_view

                await usage_view(scope, send, runtime, ex, authenticate)
            elif path.startswith(("/v1/responses/", "/v1/conversations")):
                raise GatewayError(
                    501,
                    "Stored responses and conversations are not available on this gateway yet.",
                    code="not_implemented",
                )
            else:
                raise GatewayError(404, f"Invalid URL ({method} {path})", code="not_found")
        except GatewayError as error:
            if ex.final is None:
                outcome = "rejected"
                if ex.attempts:
                    outcome = "rate_limited" if error.status == 429 else "upstream_error"
                ex.finish(error.status, outcome)
            await send_error(send, error, ex.rid)
        except ClientGone:
            if ex.final is None:
                ex.finish(499, "client_disconnected")
        finally:
            if ex.key is not None and path == "/v1/responses":
                runtime.meter.record(ex.event(ex.billed()[1]))

    async def models(self, scope: Scope, send: Send, runtime: Runtime, ex: Exchange, model_id: str) -> None:
        await runtime.fresh_token()
        snapshot = await runtime.config.current()
        key = authenticate(scope, snapshot)
        visible = [
            {"id": model, "object": "model", "created": entry.created, "owned_by": entry.owned_by}
            for model, entry in sorted(snapshot.models.items())
            if key.allowed_models is None or model in key.allowed_models
        ]
        if not model_id:
            await send_json(send, 200, orjson.dumps({"object": "list", "data": visible}), ex.rid)
            return
        for entry in visible:
            if entry["id"] == model_id:
                await send_json(send, 200, orjson.dumps(entry), ex.rid)
                return
        raise GatewayError(
            404, f"The model '{model_id}' does not exist or you do not have access to it.", code="model_not_found"
        )

    async def responses(self, scope: Scope, receive: Receive, send: Send, runtime: Runtime, ex: Exchange) -> None:
        await runtime.start()
        validated: dict[str, Any] | None = None
        size = 0
        for retry in (False, True):
            snapshot = await runtime.config.current()
            try:
                ex.key = authenticate(scope, snapshot)
                if validated is None:
                    raw = await read_body(scope, receive, settings.GATEWAY_MAX_BODY_BYTES)
                    size = len(raw)
                    validated = self._parse(raw, ex)
                request, plan, decision = await self._admit(scope, runtime, ex, snapshot, validated, size)
            except GatewayError as error:
                # With Redis this replica learns of config changes from the admission
                # script; a refusal decided before it (unknown key or model) is checked
                # against the current token once, so new keys work on their first request.
                if retry or runtime.redis is None or error.status not in (401, 403, 404, 503):
                    raise
                if await runtime.fresh_token() == snapshot.token:
                    raise
                continue
            if runtime.redis is None or decision.config_token == snapshot.token or retry:
                break
            # The admission read a newer config token: this replica's snapshot is stale.
            # Undo the admission and decide again on the new configuration.
            runtime.token = decision.config_token
            if decision.ticket is not None:
                runtime.limiter.cancel(decision.ticket)
                # Applied before the next admission: still queued, the cancelled admission
                # would hold its slot, reservation and place in the minute, and could refuse
                # its own retry.
                await runtime.limiter.flush()
        ex.headers = decision.headers
        if not decision.allowed or decision.ticket is None:
            raise rejection_error(decision)
        ticket = decision.ticket
        try:
            await Dispatcher(runtime, ex, request, plan, snapshot, decision.headers).run(receive, send)
        except Failed as failed:
            raise failed.error from None
        finally:
            tokens, cost = ex.billed()
            micros = usd_to_micros(cost) if cost is not None else None
            if ex.final is None or ex.final[0] >= 400:
                # No upstream answer (every attempt failed, or none was made) or an error answer
                # (an upstream 4xx relayed): only usage an upstream reported is billed; the rest
                # of the reservation is refunded. Unknown usage of a real answer keeps the estimate.
                tokens, micros = tokens or 0, micros or 0
            runtime.limiter.settle(ticket, tokens=tokens, micros=micros)

    @staticmethod
    def _parse(raw: bytes, ex: Exchange) -> dict[str, Any]:
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
        validated = validate_request(body)
        ex.stream = bool(validated.get("stream"))
        return validated

    async def _admit(
        self,
        scope: Scope,
        runtime: Runtime,
        ex: Exchange,
        snapshot: Snapshot,
        validated: dict[str, Any],
        body_size: int,
    ) -> tuple[dict[str, Any], list[tuple[str, int, str]], Decision]:
        """Policy, plan and admission under ``snapshot`` (the one choke point for limits)."""
        key = ex.key
        assert key is not None
        client = scope.get("client")
        request = apply_policy(validated, key, client[0] if client else None)
        plan = plan_request(snapshot, key, request)
        if request.get("conversation") is not None:
            raise GatewayError(
                501,
                "Stored conversations are not implemented on this gateway yet; send the full context in 'input'.",
                code="not_implemented",
                param="conversation",
            )
        now = time.time()
        max_output = request.get("max_output_tokens")
        tokens = estimate_tokens(body_size, max_output, default_output=settings.GATEWAY_DEFAULT_OUTPUT_RESERVE)
        ex.price = price = snapshot.prices.lookup(request["model"], now)
        micros = 0
        if price is not None:
            output = max_output if max_output is not None else settings.GATEWAY_DEFAULT_OUTPUT_RESERVE
            micros = usd_to_micros(estimate_cost_usd(tokens - output, output, price))
        decision = await runtime.limiter.admit(key.scopes(now), tokens=tokens, micros=micros, now=now)
        return request, plan, decision

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await get_runtime().start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await shutdown_runtime()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _allow(method: str, allowed: str, path: str) -> None:
    if method != allowed:
        raise GatewayError(405, f"Method {method} is not allowed on {path}; use {allowed}.", code="method_not_allowed")


gateway_app = GatewayApp()
