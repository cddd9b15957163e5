"""Sending a request upstream: account selection, attempts, failover, relaying.

``Dispatcher.run`` walks the request's attempt plan (the model's targets, then its
fallbacks' targets; see accounts/routing/routes.py). For each target it picks an account
with the pool's strategy (accounts/routing/selection.py), honouring health, concurrency caps
and the prompt-cache binding (accounts/routing/stickiness.py). Before the first byte reaches
the client, a failed attempt (connect error, timeout, 5xx, 408, 429, a rejected
credential) is reported to the account's health and retried on another account, up
to ``GATEWAY_MAX_ATTEMPTS`` attempts and ``GATEWAY_FAILOVER_DEADLINE`` seconds.
Streams are held back until real output arrives (gateway/dataplane/relay.py), so an upstream
that fails right after ``response.created`` is retried invisibly too.

Every attempt is noted on the exchange (account, outcome, status, usage) for metering.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import time
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from django.conf import settings

from accounts.health.machine import (
    Admission,
    AuthFailure,
    Event,
    ServerError,
    Success,
    event_for_exception,
    event_for_status,
)
from accounts.routing.stickiness import sticky_key
from accounts.upstream.account import AccountInfo
from accounts.upstream.client import UpstreamError, UpstreamStream, UpstreamTimeout
from accounts.upstream.timers import CoarseTimers
from gateway.conf.hot import hot
from gateway.config.snapshot import Snapshot
from gateway.contract.errors import RATE_LIMIT, SERVER, GatewayError
from gateway.contract.sanitize import sanitize_for_upstream
from gateway.contract.upstream_errors import upstream_error_body
from gateway.dataplane.asgi_io import ClientGone, Receive, Send, send_json
from gateway.dataplane.relay import COMMIT, SseRelay
from gateway.observability import tracing
from tenancy.pricing import usage_fields

if TYPE_CHECKING:
    from gateway.dataplane.exchange import Exchange
    from gateway.dataplane.runtime import Runtime

# Upstream headers worth relaying to the client on an error answer.
_RELAYED_ERROR_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
# Statuses that say "try another account" rather than "the request is wrong".
_RETRY_STATUSES = frozenset({401, 403, 408, 429})


def upstream_headers(account: AccountInfo, stream: bool) -> httpx.Headers:
    """The upstream request headers: one shared, read-only object per (credential, stream)."""
    return _upstream_headers(account.credential, stream)


@functools.lru_cache(maxsize=1024)
def _upstream_headers(credential: str | None, stream: bool) -> httpx.Headers:
    # Built once: constructing httpx.Headers per request was a measurable share of its cost.
    # identity: the relay forwards raw bytes, so a compressed upstream body would reach
    # the client as garbage.
    headers = {
        "content-type": "application/json",
        "accept": "text/event-stream" if stream else "application/json",
        "accept-encoding": "identity",
    }
    if credential:
        headers["authorization"] = f"Bearer {credential}"
    return httpx.Headers(headers)


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    """An endpoint of the Responses API that the data plane relays to an account.

    ``path`` is appended to the account's ``/responses`` URL; a JSON answer is valid when its
    ``object`` is ``object``; ``billed`` endpoints generate (tokens are reserved, billed and
    metered), the others count only against the request rate; only ``streams`` endpoints
    may answer with a stream.
    """

    path: str
    object: str
    billed: bool
    streams: bool


RESPONSES = Endpoint("", "response", billed=True, streams=True)
COMPACT = Endpoint("/compact", "response.compaction", billed=True, streams=False)
INPUT_TOKENS = Endpoint("/input_tokens", "response.input_tokens", billed=False, streams=False)


class Failed(Exception):
    """Every attempt failed: ``error`` is what the client gets."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class Deadline:
    """Cancels the task serving an attempt when its upstream answer overruns.

    ``total`` seconds for the whole answer; once a stream started (:meth:`stream`), also
    ``idle`` seconds without an event (:meth:`event`, called by the relay for every chunk
    with an event in it; the upstream's keep-alive comments do not count). One coarse timer
    per attempt (``timers``: accounts/upstream/timers.py, up to its resolution late),
    re-armed only when it fires early, so an event costs one clock read. ``expired`` says
    which ran out ("total" or "idle"; "" while none has): the caller turns the cancellation
    into UpstreamTimeout with :meth:`check`.
    """

    __slots__ = ("_idle", "_last", "_loop", "_task", "_timer", "_timers", "_total_at", "expired")

    def __init__(
        self,
        total: float,
        timers: CoarseTimers,
        loop: asyncio.AbstractEventLoop | None = None,
        task: asyncio.Task[Any] | None = None,
    ) -> None:
        """``loop`` and ``task``: the running loop and the task to cancel, when the caller has
        them (each ``asyncio.get_running_loop()`` is a ``getpid`` system call)."""
        self._loop = loop = loop or asyncio.get_running_loop()
        self._task = task or asyncio.current_task(loop)
        self._timers = timers
        now = loop.time()
        self._total_at = now + total
        self._idle = total
        self._last = now
        self.expired = ""
        self._timer = timers.call_at(loop, self._total_at, self._fire)

    def stream(self, idle: float) -> None:
        """A stream started: from now on it also fails after ``idle`` seconds without an event."""
        self._idle = idle
        self._last = now = self._loop.time()
        if now + idle < self._timer.when:
            self._timer.cancel()
            self._timer = self._timers.call_at(self._loop, now + idle, self._fire)

    def event(self) -> None:
        self._last = self._loop.time()

    def _fire(self) -> None:
        now = self._loop.time()
        due = min(self._total_at, self._last + self._idle)
        if now < due:
            self._timer = self._timers.call_at(self._loop, due, self._fire)
            return
        self.expired = "total" if now >= self._total_at else "idle"
        if self._task is not None:
            self._task.cancel()

    def check(self) -> UpstreamTimeout:
        """After a CancelledError: the UpstreamTimeout it stands for, or re-raise it (not ours)."""
        if not self.expired or self._task is None:
            raise asyncio.CancelledError
        self._task.uncancel()
        if self.expired == "total":
            return UpstreamTimeout(f"the upstream's answer took over {settings.GATEWAY_UPSTREAM_TOTAL_TIMEOUT:g}s")
        return UpstreamTimeout(f"the upstream sent nothing for {settings.GATEWAY_UPSTREAM_IDLE_TIMEOUT:g}s")

    def close(self) -> None:
        self._timer.cancel()


@dataclasses.dataclass(eq=False, slots=True)
class Dispatcher:
    """One request's attempts. ``run`` answers the client or raises ``Failed``/GatewayError."""

    rt: Runtime
    ex: Exchange
    request: dict[str, Any]
    plan: list[tuple[str, int, str]]
    snapshot: Snapshot
    extra: list[tuple[bytes, bytes]]  # headers added to the answer (the policy's decision)
    endpoint: Endpoint = RESPONSES
    tried: set[int] = dataclasses.field(default_factory=set, init=False)
    last_error: GatewayError | None = dataclasses.field(default=None, init=False)
    sticky_value: str = dataclasses.field(default="", init=False)

    def __post_init__(self) -> None:
        self.sticky_value = sticky_value(self.request)

    async def run(self, receive: Receive, send: Send) -> None:
        max_attempts = hot.GATEWAY_MAX_ATTEMPTS
        deadline = time.monotonic() + hot.GATEWAY_FAILOVER_DEADLINE
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        for public_model, pool_id, upstream_model in self.plan:
            candidates = self.snapshot.targets.get((pool_id, upstream_model), [])
            strategy = self.snapshot.strategies.get(pool_id, "weighted_round_robin")
            key = sticky_key(self.ex.tenant_id, pool_id, self.sticky_value) if self.sticky_value else ""
            while len(self.ex.attempts) < max_attempts and time.monotonic() < deadline:
                bound = await self.rt.sticky.lookup(key) if key else None
                account = self.rt.selector.pick(
                    pool_id, candidates, strategy=strategy, exclude=self.tried, sticky_account=bound
                )
                if account is None:
                    break
                # Taken before any await: the cap and least-in-flight see this request now.
                lease = self.rt.selector.inflight.acquire(account.account_id)
                self.tried.add(account.account_id)
                try:
                    if self.rt.health.admission(account.account_id) is Admission.TRIAL and not (
                        await self.rt.health.try_acquire_probe(account.account_id)
                    ):
                        continue
                    overrun = Deadline(hot.GATEWAY_UPSTREAM_TOTAL_TIMEOUT, self.rt.timers, loop, task)
                    with tracing.attempt_span(self.ex, account, upstream_model):
                        try:
                            served = await self._attempt(
                                account, public_model, upstream_model, key, receive, send, overrun
                            )
                        except asyncio.CancelledError:
                            # The deadline ran out where no step of the attempt expected it.
                            exc = overrun.check()
                            await self._failed(account, event_for_exception(exc), "upstream_error", 502, str(exc))
                            served = False
                        finally:
                            overrun.close()
                    if served:
                        return
                finally:
                    lease.release()
        raise Failed(self._exhausted())

    async def _attempt(
        self,
        account: AccountInfo,
        public_model: str,
        upstream_model: str,
        sticky: str,
        receive: Receive,
        send: Send,
        deadline: Deadline,
    ) -> bool:
        """One try on ``account``: True when the client got its answer, False to go on."""
        ex = self.ex
        ex.account = account
        ex.model = public_model
        ex.upstream_model = upstream_model
        ex.attempt_started = time.monotonic()
        request = self.request if upstream_model == self.request["model"] else {**self.request, "model": upstream_model}
        if ex.body_bytes < self.rt.offload.threshold:  # most bodies: inline, no await
            payload = _payload(request, account.strip_fields)
        else:
            payload = await self.rt.offload.run(ex.body_bytes, _payload, request, account.strip_fields)
        try:
            try:
                path = self.endpoint.path
                url = account.responses_url + path if path else account.responses_url
                headers = tracing.inject(upstream_headers(account, ex.stream))  # traceparent, when tracing
                upstream = await self.rt.upstream.open(url, headers, payload)
            except asyncio.CancelledError:
                raise deadline.check() from None
        except UpstreamError as exc:
            await self._failed(account, event_for_exception(exc), "upstream_error", 502, str(exc))
            return False
        is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
        if ex.stream and upstream.status == 200 and is_sse:
            return await self._stream(upstream, (account, upstream_model, sticky, deadline), receive, send)
        try:
            try:
                content = await upstream.read(hot.GATEWAY_UPSTREAM_MAX_BODY_BYTES)
            except asyncio.CancelledError:
                raise deadline.check() from None
        except UpstreamError as exc:
            await self._failed(account, event_for_exception(exc), "upstream_error", 502, str(exc))
            return False
        finally:
            await upstream.aclose()
        deadline.close()
        status = upstream.status
        event = event_for_status(status, upstream.headers, content)
        if status >= 500 or status < 200 or 300 <= status < 400 or status in _RETRY_STATUSES:
            # 3xx: redirects are never followed (a moved or misconfigured base URL), and
            # never relayed: like a 5xx, the account failed and the next one is tried.
            outcome = "rate_limited" if status == 429 else "upstream_error"
            await self._failed(account, event, outcome, status, f"the upstream answered {status}")
            return False
        if event is not None:
            await self.rt.report_health(account.account_id, _blame(event, self.ex.tenant_id))
        if status >= 400:
            # The request's own fault: the client gets the upstream's status and what its
            # envelope says, rebuilt (never HTML, an empty body or the account's credential).
            extra = [
                (name.encode(), upstream.headers[name].encode())
                for name in _RELAYED_ERROR_HEADERS
                if name in upstream.headers
            ]
            ex.finish(status, "upstream_rejected")
            ex.error_code = "upstream_rejected"
            body = upstream_error_body(status, content, (account.credential,))
            await send_json(send, status, body, ex.rid, [*self.extra, *extra])
            return True
        if ex.stream or is_sse:
            # A stream where JSON was asked for, or JSON where a stream was: the client's
            # parser would choke on it. The account misbehaves: the next one is tried.
            what = "a stream" if is_sse else "a JSON answer"
            await self._failed(
                account, ServerError("protocol"), "upstream_error", 502, f"the upstream answered {what} to this request"
            )
            return False
        try:
            response = orjson.loads(content)
        except orjson.JSONDecodeError:
            response = None
        if not isinstance(response, dict) or response.get("object") != self.endpoint.object:
            await self._failed(
                account,
                ServerError("protocol"),
                "upstream_error",
                502,
                f"the upstream's answer is not a {self.endpoint.object} object",
            )
            return False
        self._bind(sticky, account, upstream_model)
        # Noted before sending: a client gone meanwhile is recorded with this answer's usage.
        ex.finish(
            status,
            str(response.get("status") or "completed"),
            usage_fields(response.get("usage")),
            response_id=str(response.get("id") or ""),
            ttfb_ms=(time.monotonic() - ex.started) * 1000,
        )
        with tracing.span("gateway.relay"):
            await send_json(send, status, content, ex.rid, self.extra)
        return True

    async def _stream(
        self, upstream: UpstreamStream, attempt: tuple[AccountInfo, str, str, Deadline], receive: Receive, send: Send
    ) -> bool:
        """Relay a stream that answered 200 (``attempt``: account, upstream model, sticky key, deadline)."""
        account, upstream_model, sticky, deadline = attempt
        ex = self.ex
        relay = SseRelay(send, ex.started, settings.GATEWAY_UPSTREAM_MAX_FRAME_BYTES)
        relay.on_event = deadline.event
        deadline.stream(settings.GATEWAY_UPSTREAM_IDLE_TIMEOUT)
        chunks = upstream.chunks()
        try:
            try:
                verdict = await relay.hold(chunks, settings.GATEWAY_STREAM_HOLD_SECONDS)
            except asyncio.CancelledError:
                raise deadline.check() from None
        except UpstreamError as exc:
            relay.discard()
            await upstream.aclose()
            await self._failed(account, event_for_exception(exc), "upstream_error", 502, str(exc))
            return False
        except BaseException:
            relay.discard()
            await upstream.aclose()
            raise
        if verdict != COMMIT:
            relay.discard()
            await upstream.aclose()
            code = relay.failure_code or "stream_incomplete"
            await self._failed(
                account, event_for_exception(UpstreamError(code)), "upstream_error", 200, code, relay.usage
            )
            return False
        await self.rt.report_health(account.account_id, Success())
        self._bind(sticky, account, upstream_model)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*_SSE_HEADERS, *self.extra, (b"x-request-id", ex.rid)],
            }
        )
        self.rt.keepalive.register(relay.entry)
        tail = b""
        try:
            with tracing.span("gateway.relay"):
                await relay.run(chunks)
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
            # The client left (gateway/dataplane/disconnect.py cancelled this task): keep the
            # usage seen. Else the deadline ran out (or the cancellation is not ours: re-raised).
            task = asyncio.current_task()
            if ex.client_gone and task is not None:
                task.uncancel()
                outcome = "client_disconnected"
            else:
                timeout = deadline.check()
                outcome = "upstream_error"
                tail = relay.failure_frames(
                    "upstream_timeout",
                    f"The upstream stream failed: {timeout}.",
                    model=ex.model,
                    request_id=ex.request_id,
                )
        except ClientGone:  # a relayed frame could not be sent
            outcome = "client_disconnected"
        finally:
            deadline.close()
            relay.discard()
            self.rt.keepalive.unregister(relay.entry)
            await upstream.aclose()
        if outcome != "client_disconnected":
            try:
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            except Exception:  # the client left during the last frame; usage still counts
                outcome = "client_disconnected"
        ex.finish(200, outcome, relay.usage, response_id=relay.response_id, ttfb_ms=relay.ttfb_ms)
        return True

    async def _failed(
        self,
        account: AccountInfo,
        event: Any,
        outcome: str,
        status: int,
        detail: str,
        usage: dict[str, int | None] | None = None,
    ) -> None:
        if event is not None:
            await self.rt.report_health(account.account_id, _blame(event, self.ex.tenant_id))
        # Every attempt carries the token fields (None: the upstream reported nothing).
        self.ex.note_attempt(account.account_id, outcome, status, usage if usage is not None else usage_fields(None))
        self.last_error = GatewayError(
            502, f"The upstream request failed: {detail}.", type=SERVER, code="upstream_error"
        )

    def _bind(self, sticky: str, account: AccountInfo, upstream_model: str) -> None:
        """Bind the prompt-cache key to ``account`` unless a healthy binding exists."""
        if sticky:
            members = {a.account_id for a in self.snapshot.targets.get((account.pool_id, upstream_model), ())}
            health = self.rt.health
            self.rt.sticky.bind(sticky, account.account_id, lambda i: health.usable(i) and i in members)

    def _exhausted(self) -> GatewayError:
        """The answer when no attempt served the request."""
        ids = [
            account.account_id
            for _, pool_id, model in self.plan
            for account in self.snapshot.targets.get((pool_id, model), ())
        ]
        blocked = self.rt.health.blocked(ids)
        now = time.time()
        if blocked.cooling_until is not None and (
            blocked.open_until is None or blocked.cooling_until <= blocked.open_until
        ):
            retry = max(1, math.ceil(blocked.cooling_until - now))
            return GatewayError(
                429,
                f"Every upstream account for this model is rate limited; retry in {retry}s.",
                type=RATE_LIMIT,
                code="usage_limit_reached",
                headers=[*self.extra, (b"retry-after", b"%d" % retry)],
            )
        if self.last_error is not None:
            self.last_error.headers = [*self.extra, *self.last_error.headers]
            return self.last_error
        if blocked.open_until is not None:
            retry = max(1, math.ceil(blocked.open_until - now))
            return GatewayError(
                503,
                "The upstream accounts for this model are failing; retry shortly.",
                type=SERVER,
                code="no_accounts",
                headers=[*self.extra, (b"retry-after", b"%d" % retry)],
            )
        return GatewayError(
            503,
            "No upstream account is available for this model right now.",
            type=SERVER,
            code="no_accounts",
            headers=[*self.extra, (b"retry-after", b"1")],
        )


def _blame(event: Event, tenant_id: int) -> Event:
    """``event`` as the evidence of ``tenant_id``'s request (accounts/health/machine.py: a
    tenant's 401/403 or server errors are confirmed by a probe before they take the account)."""
    if isinstance(event, AuthFailure | ServerError):
        return dataclasses.replace(event, tenant=tenant_id)
    return event


def _payload(request: dict[str, Any], strip_fields: frozenset[str]) -> bytes:
    return orjson.dumps(sanitize_for_upstream(request, strip_fields))


def sticky_value(request: dict[str, Any]) -> str:
    """What binds a request to an account's prompt cache: its ``prompt_cache_key``; "" none.

    (A stateful request's ``conversation`` is taken out before dispatch: gateway/dataplane/stateful.py.)
    """
    sticky = request.get("prompt_cache_key")
    return str(sticky) if sticky else ""
