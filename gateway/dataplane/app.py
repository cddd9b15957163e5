"""The data plane's ASGI application behind /v1/* (mounted by gateway/conf/asgi.py).

A plain ASGI callable rather than channels' AsyncHttpConsumer: the consumer base
dispatches messages one at a time, so while a stream is being relayed it could not see
the client's ``http.disconnect``, and it sets up a channel-layer inbox per request. No
database query per request: keys, limits, routes and prices come from the in-memory
snapshot (:mod:`gateway.config.snapshot`), usage leaves through the meter.

The app is the one error boundary of the data plane: a :class:`GatewayError` is
answered with its OpenAI envelope; any other exception is logged (with the request id)
and answered ``500 server_error`` in the same envelope, never a bare 500, and never
after the response started (then the stream's own failure path has already answered).
A dependency outage is not a bug: Redis unreachable (any request that needs it) or the
database unreachable (``/v1/usage``) is answered ``503 service_unavailable`` with
``Retry-After`` and reported to readiness, logged once per outage
(gateway/dataplane/outages.py). ``GET /readyz`` answers the readiness report: ``503`` while
no request can be served (Redis down, or usage cannot be recorded), else ``200`` with what
is degraded.
It also owns the process state (:class:`Runtime`): started at the ASGI lifespan's
start-up and closed at its shutdown, after the requests still running have recorded
their usage (up to ``SHUTDOWN_WAIT_SECONDS``). Daphne (4.2, the version installed) sends
no lifespan events: there the first request starts the runtime, and a Twisted "before
shutdown" trigger (the hook Daphne uses itself to cancel its running requests) closes
it the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable

import orjson
from django.conf import settings

from gateway.contract.errors import SERVER, GatewayError
from gateway.dataplane.asgi_io import ClientGone, Receive, Scope, Send, send_error, send_json
from gateway.dataplane.dispatch import COMPACT, INPUT_TOKENS
from gateway.dataplane.exchange import Exchange
from gateway.dataplane.models_endpoint import models
from gateway.dataplane.outages import REDIS_ERRORS, database_errors, reason, unavailable
from gateway.dataplane.responses import responses
from gateway.dataplane.runtime import Runtime
from gateway.dataplane.stateful import stored
from gateway.dataplane.usage_endpoint import usage
from gateway.observability import exposition, tracing

logger = logging.getLogger(__name__)


# Paths whose requests leave a usage record (counting input tokens generates nothing).
_METERED = frozenset({"/v1/responses", "/v1/responses/compact"})

# Paths counted in the metrics and the access log, and their route label (others: "other";
# /readyz and /metrics are neither counted nor logged).
_ROUTES = {
    "/v1/responses": "responses",
    "/v1/responses/compact": "compact",
    "/v1/responses/input_tokens": "input_tokens",
    "/v1/models": "models",
    "/v1/usage": "usage",
}

# At shutdown, how long the requests still running may take to record their usage
# before the runtime (and its usage meter) is closed.
SHUTDOWN_WAIT_SECONDS = 5.0


class GatewayApp:
    """ASGI application for /v1/* and the lifespan protocol; owns the process's :class:`Runtime`."""

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self._starting: asyncio.Lock | None = None
        self._running = 0  # requests being served
        self._idle: asyncio.Event | None = None  # set when the last of them ends (at shutdown)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        ex = Exchange("req_" + os.urandom(12).hex(), time.monotonic())
        try:
            runtime = self.runtime or await self._start_without_lifespan()
        except Exception:
            logger.exception("the data plane could not start (%s)", ex.request_id)
            await send_error(send, _internal_error(), ex.rid)
            return
        self._running += 1
        try:
            with tracing.request_span(scope["method"], scope["path"], scope["headers"], ex):
                await self._serve(scope, receive, send, runtime, ex)
        finally:
            self._running -= 1
            if not self._running and self._idle is not None:
                self._idle.set()

    async def ready_runtime(self) -> Runtime:
        """The started runtime (started now under a server that sends no lifespan events)."""
        return self.runtime or await self._start_without_lifespan()

    async def _serve(self, scope: Scope, receive: Receive, send: Send, runtime: Runtime, ex: Exchange) -> None:
        path = scope["path"]
        method = scope["method"]
        started = False

        async def tracked(message: dict[str, object]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            try:
                await send(message)
            except (OSError, RuntimeError) as exc:
                # The connection is closed under the server's feet: uvicorn does not tell a
                # pipelined request that its client left, and its transport then refuses
                # writes with a RuntimeError (uvloop: "... the handler is closed").
                if isinstance(exc, RuntimeError) and "closed" not in str(exc):
                    raise
                ex.client_gone = True
                raise ClientGone from None

        try:
            try:
                await self._route(scope, receive, tracked, runtime, ex)
            except REDIS_ERRORS as exc:
                runtime.dependency_failed("redis", reason(exc))
                raise unavailable("redis") from None
            except database_errors() as exc:
                runtime.dependency_failed("database", reason(exc))
                raise unavailable("database") from None
        except GatewayError as error:
            ex.error_code = error.code or ""
            if ex.final is None:
                outcome = "rejected"
                if ex.attempts:
                    outcome = "rate_limited" if error.status == 429 else "upstream_error"
                ex.finish(error.status, outcome)
            if ex.client_gone:
                ex.client_left()
            elif not started:
                await _answer(tracked, error, ex)
        except ClientGone:
            ex.client_left()
        except Exception:
            logger.exception("unhandled error in %s %s (%s)", method, path, ex.request_id)
            ex.error_code = "server_error"
            if ex.final is None:
                ex.finish(500, "failed")
            if not started:
                await _answer(tracked, _internal_error(), ex)
        finally:
            cost = None
            now = time.monotonic()
            if ex.key is not None and path in _METERED and not ex.deferred:
                cost = ex.billed()[1]
                event = ex.event(cost, now)
                runtime.meter.record(event)
                runtime.live.publish(event, ex.key.prefix)
            route = _ROUTES.get(path)
            if route is not None and not ex.deferred:  # a background response: when its task ends
                runtime.observe(ex, route, method, path, cost, now)

    async def _route(self, scope: Scope, receive: Receive, send: Send, runtime: Runtime, ex: Exchange) -> None:
        path = scope["path"]
        method = scope["method"]
        if path == "/v1/responses":
            _allow(method, "POST", path)
            await responses(scope, receive, send, runtime, ex)
        elif path == "/v1/responses/compact":
            _allow(method, "POST", path)
            await responses(scope, receive, send, runtime, ex, COMPACT)
        elif path == "/v1/responses/input_tokens":
            _allow(method, "POST", path)
            await responses(scope, receive, send, runtime, ex, INPUT_TOKENS)
        elif path == "/v1/models" or path.startswith("/v1/models/"):
            _allow(method, "GET", path)
            await models(scope, send, runtime, ex, path[len("/v1/models/") :])
        elif path == "/v1/usage":
            _allow(method, "GET", path)
            await usage(scope, send, runtime, ex)
        elif path == "/readyz":
            _allow(method, "GET", path)
            await readyz(send, runtime, ex)
        elif path == "/metrics" and runtime.metrics is not None:
            _allow(method, "GET", path)
            await metrics(scope, send, runtime, ex)
        elif path.startswith("/v1/responses/") or path == "/v1/conversations" or path.startswith("/v1/conversations/"):
            await stored(scope, receive, send, runtime, ex)  # 501 unless the key's stateful policy is on
        else:
            raise GatewayError(404, f"Invalid URL ({method} {path})", code="not_found")

    async def _open(self) -> Runtime:
        """A started runtime; one that fails to start is closed again (the error propagates)."""
        runtime = Runtime()
        try:
            await runtime.start()
        except BaseException:
            await runtime.aclose()
            raise
        self.runtime = runtime
        return runtime

    async def _close(self) -> None:
        """Let the requests still running record their usage, then close the runtime."""
        runtime = self.runtime
        if runtime is None:
            return
        if self._running:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), SHUTDOWN_WAIT_SECONDS)
            except TimeoutError:
                logger.warning("closing the data plane with %d requests still running", self._running)
        await runtime.aclose()

    async def _start_without_lifespan(self) -> Runtime:
        """A server that sends no lifespan events (Daphne): the first request starts the runtime."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.runtime is not None:
                return self.runtime
            runtime = await self._open()
            _close_at_reactor_shutdown(self._close)
            return runtime

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._open()
                except Exception as exc:
                    logger.exception("the data plane could not start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _close_at_reactor_shutdown(close: Callable[[], Awaitable[None]]) -> None:
    """Under Daphne (a running Twisted reactor), run ``close`` at the reactor's shutdown.

    A "before shutdown" trigger that returns a Deferred holds the shutdown until it fires
    (Twisted's ``IReactorCore.addSystemEventTrigger``). Elsewhere (a test calling the app)
    nothing is registered.
    """
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None or not getattr(reactor, "running", False):
        return
    from twisted.internet.defer import Deferred

    def before_shutdown() -> Deferred[None]:
        return Deferred.fromFuture(asyncio.ensure_future(close()))

    reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)


async def readyz(send: Send, runtime: Runtime, ex: Exchange) -> None:
    """The readiness report; 503 while no request can be served (see the module doc).

    Not ready: Redis down, the meter saturated, the usage writer not running (when this
    process runs one), or more than ``GATEWAY_READY_MAX_BACKLOG`` usage records waiting;
    ``reasons`` says which, one sentence each.
    """
    await runtime.check_redis()
    report = runtime.readiness.report()
    reasons: list[str] = []
    if runtime.readiness.is_down("redis"):
        reasons.append("redis is unavailable")
    if runtime.meter.saturated:
        reasons.append("usage cannot leave this process (the meter's buffer is full)")
    if runtime.writer is not None and not runtime.writer_up():
        reasons.append("the usage writer is not running")
    try:
        backlog: int | None = await runtime.usage_backlog()
    except Exception as exc:  # Redis went away meanwhile: reported above on the next call
        backlog = None
        reasons.append(f"the usage backlog cannot be read ({reason(exc)})")
    limit = settings.GATEWAY_READY_MAX_BACKLOG
    if backlog is not None and backlog > limit:
        reasons.append(f"{backlog} usage records wait to be written (more than {limit})")
    report["usage_backlog"] = backlog
    report["reasons"] = reasons
    report["serving"] = not reasons
    await send_json(send, 503 if reasons else 200, orjson.dumps(report), ex.rid)


async def metrics(scope: Scope, send: Send, runtime: Runtime, ex: Exchange) -> None:
    """``GET /metrics`` (gateway/observability/exposition.py): protected, every worker's values
    (this process's tallies flushed first; another worker's are at most ``FLUSH_SECONDS`` old)."""
    client = scope.get("client")
    authorization = next((value for name, value in scope["headers"] if name == b"authorization"), None)
    exposition.allowed(client[0] if client else None, authorization, settings.GATEWAY_METRICS_TOKEN)
    if runtime.recorder is not None:
        runtime.recorder.flush()
    body, content_type = exposition.render()
    headers = [(b"content-type", content_type.encode()), (b"x-request-id", ex.rid)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _answer(send: Send, error: GatewayError, ex: Exchange) -> None:
    """Send ``error``'s envelope; a client already gone is recorded as such."""
    try:
        await send_error(send, error, ex.rid)
    except ClientGone:
        ex.client_left()


def _internal_error() -> GatewayError:
    return GatewayError(
        500, "The gateway had an internal error while serving this request.", type=SERVER, code="server_error"
    )


def _allow(method: str, allowed: str, path: str) -> None:
    if method != allowed:
        raise GatewayError(405, f"Method {method} is not allowed on {path}; use {allowed}.", code="method_not_allowed")


gateway_app = GatewayApp()
