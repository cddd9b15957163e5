"""``POST /v1/responses`` (and its JSON siblings ``/compact`` and ``/input_tokens``): admit -> dispatch -> settle.

authenticate -> read the body (size limit) -> parse -> nesting depth (at most 64 levels,
gateway/contract/nesting.py) -> validate (seed 004) -> key policy
(a large body's parsing and validation in a worker thread: gateway/dataplane/offload.py)
-> model access and attempt plan -> admission (every limit and budget in one atomic step:
the single choke point) -> dispatch with failover (:mod:`gateway.dataplane.dispatch`) ->
settle the reservation with what was really used. The caller (the app) meters the
exchange whatever happened.

``/v1/responses/compact`` and ``/v1/responses/input_tokens`` take the same path with their
:class:`~gateway.dataplane.dispatch.Endpoint`: the seed's validation of the fields they share
with a response, the key's policy and models, failover; never a stream. A compaction is
billed like a response; counting input tokens reserves nothing and counts only against the
request rate (and is not metered: it generates nothing).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from accounts.routing.stickiness import sticky_key
from gateway.conf.hot import hot
from gateway.config.snapshot import Snapshot
from gateway.contract.errors import SERVER, GatewayError, invalid_request
from gateway.contract.nesting import check_nesting
from gateway.contract.policy import apply_policy
from gateway.contract.validation import validate_request
from gateway.dataplane.asgi_io import Receive, Scope, Send, read_body, send_json
from gateway.dataplane.auth import Plan, authenticate, plan_request
from gateway.dataplane.disconnect import ClientWatch
from gateway.dataplane.dispatch import RESPONSES, Dispatcher, Endpoint, Failed, sticky_value
from gateway.dataplane.exchange import Exchange
from gateway.dataplane.runtime import Runtime
from gateway.dataplane.stateful import Recorder, Turn, never_receive, prepare, start_background
from gateway.limits.engine import Decision, estimate_tokens, rejection_error
from gateway.observability import tracing
from tenancy.pricing import estimate_cost_usd, usd_to_micros


async def responses(
    scope: Scope, receive: Receive, send: Send, runtime: Runtime, ex: Exchange, endpoint: Endpoint = RESPONSES
) -> None:
    """Serve one ``POST /v1/responses`` (or ``endpoint``); raises GatewayError for the app to answer."""
    if runtime.meter.saturated:
        # Usage cannot leave this process (a full or failing disk, Redis and the spool
        # refusing): take no work it could not meter. Checked before anything is recorded.
        raise _usage_backlog()
    validated: dict[str, Any] | None = None
    turn: Turn | None = None
    size = 0
    for retry in (False, True):
        snapshot = await runtime.config.current()
        try:
            ex.key = await authenticate(scope, runtime.config.keys)
            if validated is None:
                raw = await read_body(scope, receive, hot.GATEWAY_MAX_BODY_BYTES)
                size = ex.body_bytes = len(raw)
                stateful = ex.key.stateful and endpoint is RESPONSES
                if size < runtime.offload.threshold:  # most bodies: inline, no await
                    validated = _parse(raw, ex, endpoint, stateful)
                else:
                    validated = await runtime.offload.run(size, _parse, raw, ex, endpoint, stateful)
                if stateful:
                    # Off the stateless path: the context is read from the database (a worker thread).
                    validated, turn = await prepare(validated, ex.key)
            with tracing.span("gateway.admission"):
                request, plan, decision = await _admit(scope, runtime, ex, snapshot, validated, size, endpoint.billed)
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
        ex.refused_by = decision.exceeded or ""
        raise rejection_error(decision)
    ticket = decision.ticket
    dispatcher = Dispatcher(runtime, ex, request, plan, snapshot, decision.headers, endpoint)
    if turn is not None:
        assert ex.key is not None
        if turn.background:
            queued = await _background(runtime, ex, turn, request, dispatcher, ticket)
            await send_json(send, 200, orjson.dumps(queued), ex.rid, decision.headers)
            return
        send = Recorder(send, turn, ex.key, request["model"])  # stores the response before its end is sent
    try:
        async with ClientWatch(receive, send, ex, runtime.watches) as watch:  # a client leaving cancels the dispatch
            await dispatcher.run(receive, watch.send)
    except Failed as failed:
        raise failed.error from None
    finally:
        _settle(runtime, ex, ticket)


async def _background(
    runtime: Runtime, ex: Exchange, turn: Turn, request: dict[str, Any], dispatcher: Dispatcher, ticket: Any
) -> dict[str, Any]:
    """Start a ``background: true`` response: dispatched in a task, settled and metered when it ends."""

    async def run(send: Send) -> None:
        try:
            await dispatcher.run(never_receive, send)
        except Failed as failed:
            raise failed.error from None
        finally:
            _settle(runtime, ex, ticket)
            if ex.final is None:
                ex.finish(499 if ex.attempts else 500, "cancelled")
            cost, now = ex.billed()[1], time.monotonic()
            event = ex.event(cost, now)
            runtime.meter.record(event)
            runtime.live.publish(event, ex.key.prefix if ex.key is not None else "")
            runtime.observe(ex, "responses", "POST", "/v1/responses", cost, now)

    ex.deferred = True
    assert ex.key is not None
    try:
        return await start_background(turn, request, ex.key, run)
    except BaseException:
        ex.deferred = False
        _settle(runtime, ex, ticket)
        raise


def _settle(runtime: Runtime, ex: Exchange, ticket: Any) -> None:
    """Replace the reservation of ``ticket`` with what the exchange really used."""
    tokens, cost = ex.billed()
    micros = usd_to_micros(cost) if cost is not None else None
    if ex.final is None or ex.final[0] >= 400:
        # No upstream answer (every attempt failed, or none was made) or an error answer
        # (an upstream 4xx relayed): only usage an upstream reported is billed; the rest
        # of the reservation is refunded. Unknown usage of a real answer keeps the estimate.
        tokens, micros = tokens or 0, micros or 0
    runtime.limiter.settle(ticket, tokens=tokens, micros=micros)


def _usage_backlog() -> GatewayError:
    return GatewayError(
        503,
        "The gateway cannot record usage right now, so it takes no new requests; retry shortly.",
        type=SERVER,
        code="usage_backlog",
        headers=[(b"retry-after", b"2")],
    )


def _parse(raw: bytes, ex: Exchange, endpoint: Endpoint = RESPONSES, stateful: bool = False) -> dict[str, Any]:
    """Parse, check and validate the body (in a worker thread for a large one: Offload)."""
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
    check_nesting(raw)
    validated = validate_request(body, stateful)
    ex.stream = bool(validated.get("stream"))
    if ex.stream and not endpoint.streams:
        raise invalid_request("This endpoint answers with JSON only; remove 'stream' from the request.", param="stream")
    return validated


async def _admit(
    scope: Scope,
    runtime: Runtime,
    ex: Exchange,
    snapshot: Snapshot,
    validated: dict[str, Any],
    body_size: int,
    billed: bool = True,
) -> tuple[dict[str, Any], Plan, Decision]:
    """Policy, plan and admission under ``snapshot`` (the one choke point for limits); a
    request that is not ``billed`` reserves no tokens and no spend."""
    key = ex.key
    assert key is not None
    client = scope.get("client")
    request = apply_policy(validated, key, client[0] if client else None)
    plan = plan_request(snapshot, key, request)
    ex.planned = True
    if request.get("conversation") is not None:
        raise GatewayError(
            501,
            "Stored conversations are not implemented on this gateway yet; send the full context in 'input'.",
            code="not_implemented",
            param="conversation",
        )
    now = time.time()
    max_output = request.get("max_output_tokens")
    tokens = estimate_tokens(body_size, max_output, default_output=hot.GATEWAY_DEFAULT_OUTPUT_RESERVE)
    ex.price = price = snapshot.prices.lookup(request["model"], now)
    micros = 0
    if not billed:
        tokens = 0
    elif price is not None:
        output = max_output if max_output is not None else hot.GATEWAY_DEFAULT_OUTPUT_RESERVE
        micros = usd_to_micros(estimate_cost_usd(tokens - output, output, price))
    value = sticky_value(request)
    # The request's prompt-cache bindings, one per pool it may go to, are read with the admission.
    keys = [sticky_key(key.tenant_id, pool, value) for pool in dict.fromkeys(p for _, p, _ in plan)] if value else []
    decision = await runtime.admit(key.scopes(now), tokens=tokens, micros=micros, now=now, sticky_keys=keys)
    return request, plan, decision
