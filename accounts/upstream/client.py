"""The one module that makes outbound HTTP calls.

Everything the data plane sends to an upstream goes through :class:`UpstreamClient`,
so the transport under httpx can be chosen by benchmark (``GATEWAY_UPSTREAM_TRANSPORT``)
and tests can stub this seam. The transports:

* ``fast`` (default): accounts/upstream/transport.py, HTTP/1.1 over asyncio protocols and
  httptools (the fastest measured, docs/performance.md; no proxies, no HTTP/2).
* ``httpx``: httpx.AsyncHTTPTransport (httpcore's pool, h11): the standard stack, for
  upstreams the lean transport does not serve.

Failures surface as the exception tree below, never as httpx exceptions:

    UpstreamError
    ├── UpstreamConnectError   nothing was sent: DNS, refused, connect timeout
    ├── UpstreamTimeout        sent, but the upstream stayed silent too long
    └── UpstreamProtocolError  the connection broke or the answer was malformed
        └── UpstreamTooLarge   the answer (a body, or one SSE frame) is over the size taken
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import httpx

from accounts.upstream.timers import CoarseTimers


class UpstreamError(Exception):
    """Base of every failure talking to an upstream. The message never holds a credential."""


class UpstreamConnectError(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamProtocolError(UpstreamError):
    pass


class UpstreamTooLarge(UpstreamProtocolError):
    """The answer (a body, or one SSE frame) is over the size the gateway takes."""


def _translate(exc: httpx.HTTPError) -> UpstreamError:
    # Only the exception class name goes into the message: httpx messages can echo URLs.
    name = type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout | httpx.UnsupportedProtocol):
        return UpstreamConnectError(f"could not connect to the upstream ({name})")
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"the upstream did not answer in time ({name})")
    return UpstreamProtocolError(f"the upstream connection failed ({name})")


@dataclass(slots=True)
class UpstreamReply:
    """A complete (non-streamed) upstream answer."""

    status: int
    headers: httpx.Headers
    content: bytes


class UpstreamStream:
    """An open streamed answer. Iterate :meth:`chunks`; always :meth:`aclose`."""

    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = response.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        """Yield body bytes as they arrive; raises UpstreamError if the connection breaks."""
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise _translate(exc) from None

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; UpstreamTooLarge as soon as it is known to be over ``limit`` bytes."""
        if limit is None:
            try:
                return await self._response.aread()
            except httpx.HTTPError as exc:
                raise _translate(exc) from None
        declared = self.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise UpstreamTooLarge(f"the upstream's answer is over {limit} bytes")
        parts: list[bytes] = []
        size = 0
        try:
            async for part in self._response.aiter_bytes():
                size += len(part)
                if size > limit:
                    raise UpstreamTooLarge(f"the upstream's answer is over {limit} bytes")
                parts.append(part)
        except httpx.HTTPError as exc:
            raise _translate(exc) from None
        return b"".join(parts)

    async def aclose(self) -> None:
        # Closing a broken connection must not mask the outcome already decided.
        with contextlib.suppress(Exception):
            await self._response.aclose()


TRANSPORTS = ("fast", "httpx")


class UpstreamClient:
    """A pooled HTTP client for upstream calls. One per process, shared by every request."""

    def __init__(
        self,
        *,
        transport: str = "fast",
        connect_timeout: float = 10.0,
        read_timeout: float = 600.0,
        max_connections: int = 1000,
        timers: CoarseTimers | None = None,
    ) -> None:
        """``transport`` is one of :data:`TRANSPORTS` (ValueError otherwise).

        ``max_connections`` bounds the pool: per upstream host with ``fast``, in total otherwise.
        ``timers``: the fast transport's read deadlines (accounts/upstream/timers.py), to share
        one set of coarse timers with the process's other deadlines.
        """
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout)
        self._transport: httpx.AsyncBaseTransport
        if transport == "fast":
            from accounts.upstream.transport import FastTransport

            self._transport = FastTransport(max_connections=max_connections, timers=timers)
        elif transport == "httpx":
            self._transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
        else:
            raise ValueError(f"unknown upstream transport {transport!r}; expected one of {', '.join(TRANSPORTS)}")
        # httpcore (h11) needs the Host and Content-Length headers that only httpx.Request's full
        # constructor adds; the fast transport writes its own, so it gets the lean request.
        self._lean = transport != "httpx"
        self._extensions = {"timeout": timeout.as_dict()}
        self._urls: dict[str, httpx.URL] = {}

    async def open(self, url: str, headers: httpx.Headers | Mapping[str, str], body: bytes) -> UpstreamStream:
        """POST ``body`` to ``url`` and return once the status line and headers arrived.

        ``headers`` is only read (copied into the request), so one prebuilt ``httpx.Headers``
        may serve every request; that is cheapest (a mapping is re-normalised on every call).
        The request goes straight to the transport: the gateway needs none of AsyncClient's
        cookie, redirect or auth handling. The lean request (``stream=`` instead of
        ``content=``, for the fast transport) skips httpx's header re-normalisation: ~5 µs instead of ~25-50 µs.
        """
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._urls[url] = httpx.URL(url)
        if self._lean:
            request = httpx.Request(
                "POST", parsed, headers=headers, stream=httpx.ByteStream(body), extensions=self._extensions
            )
            request.read()  # sets request.content, which the fast transport sends from
        else:
            request = httpx.Request("POST", parsed, headers=headers, content=body, extensions=self._extensions)
        try:
            response = await self._transport.handle_async_request(request)
        except httpx.HTTPError as exc:
            raise _translate(exc) from None
        response.request = request
        return UpstreamStream(response)

    async def post(
        self, url: str, headers: httpx.Headers | Mapping[str, str], body: bytes, limit: int | None = None
    ) -> UpstreamReply:
        """POST and read the whole answer (at most ``limit`` bytes of it: UpstreamTooLarge)."""
        stream = await self.open(url, headers, body)
        try:
            content = await stream.read(limit)
        finally:
            await stream.aclose()
        return UpstreamReply(stream.status, stream.headers, content)

    async def aclose(self) -> None:
        await self._transport.aclose()
