"""A lean HTTP/1.1 transport for httpx: raw asyncio protocols and ``httptools`` parsing.

:class:`FastTransport` is an :class:`httpx.AsyncBaseTransport`, so httpx stays the API at the
upstream seam (accounts/upstream/client.py) while the per-request cost drops to a bytes join, one
``write`` and an ``httptools`` parse. It runs on whatever loop is running (uvloop under the
gateway).

Contract:

* HTTP/1.1 only, ``http`` and ``https``. TLS uses ``ssl.create_default_context()`` (certificate
  and hostname verification on, SNI from the URL host, ALPN offering only ``http/1.1``) unless
  an ``ssl_context`` is given.
* One keep-alive pool per (scheme, host, port), at most ``max_connections`` connections each
  (busy + idle + connecting); a request waits up to the ``pool`` timeout for a free one.
* The request body is sent from memory: ``request.content`` (or the stream, read first). The
  transport writes ``content-length`` itself and drops any ``content-length`` /
  ``transfer-encoding`` the request carries; ``host`` is added unless the request has one.
* :meth:`FastTransport.handle_async_request` returns once the status line and headers arrived.
  The body streams: each chunk is handed over as it arrives (what is queued when the reader asks
  is joined, never held back), framed by ``content-length``, chunked encoding or the server
  closing the connection. At most ``max_buffered`` unread bytes are queued per response before
  the socket stops being read (TCP back-pressure reaches the server).
* Timeouts come from ``request.extensions["timeout"]``: ``connect`` (TCP + TLS), ``write``
  (while the socket is not accepting the request), ``read`` (the longest silence before the
  head and between body chunks), ``pool``. They raise ``httpx.ConnectTimeout``,
  ``WriteTimeout``, ``ReadTimeout`` and ``PoolTimeout``; failures raise ``ConnectError``,
  ``ReadError`` (connection reset) or ``RemoteProtocolError`` (the server hung up early or sent
  malformed HTTP) and ``LocalProtocolError`` (a header value holds CR or LF).
* A connection goes back to the pool only when its response was complete on the wire and
  neither side asked for ``Connection: close``; a response closed before that (the client went
  away) closes its connection, so a half-read connection is never reused.
* Stale pooled connections are caught at checkout, before anything is written: one the server
  closed (the protocol saw EOF), one with unread bytes or a pending FIN on its socket (a poll
  with zero timeout), or one idle longer than ``keepalive_expiry``. The request then goes on
  another connection. A request that was written is never retried: a POST that may have
  reached the server must not run twice, so losing that race surfaces as
  ``RemoteProtocolError``.

Not supported (by design, the gateway needs none of it): proxies and ``trust_env``, HTTP/2,
``Expect: 100-continue``, protocol upgrades (101), the ``sni_hostname`` extension, Unix
sockets, response trailers (parsed and dropped). Content decoding is left to httpx.Response.
The transport is bound to the event loop it is first used on.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import cast

import httptools
import httpx

from accounts.upstream.timers import CoarseTimers

_DEFAULT_PORTS = {b"http": 80, b"https": 443}
_FRAMING = (b"content-length", b"transfer-encoding")
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))
_NO_TIMEOUTS: Mapping[str, float | None] = {}


def _expire(waiter: asyncio.Future[None], error: type[httpx.TimeoutException], message: str) -> None:
    if not waiter.done():
        waiter.set_exception(error(message))


def _readable(poller: select.poll) -> bool:
    """True when an idle socket has bytes or a FIN/RST the event loop has not processed yet."""
    try:
        return bool(poller.poll(0))
    except OSError:
        return True


@dataclass(eq=False, slots=True)
class _Pool:
    """The connections to one (scheme, host, port). ``size`` counts connecting, busy and idle ones."""

    host: str
    port: int
    host_line: bytes
    ssl: ssl.SSLContext | None
    max_size: int
    size: int = 0
    idle: deque[_Connection] = field(default_factory=deque)  # oldest left, most recently used right
    conns: set[_Connection] = field(default_factory=set)
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)

    def wake_one(self) -> None:
        """Tell one waiting request that a connection or a slot is free."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def checkout(self, now: float, expiry: float) -> _Connection | None:
        """The most recently used idle connection that is still sound, closing stale ones."""
        idle = self.idle
        # LIFO reuse leaves the oldest at the left: expire one per checkout so they don't pile up.
        if idle and now - idle[0].idle_since > expiry:
            oldest = idle.popleft()
            oldest.in_pool = False
            oldest.close()
        while idle:
            conn = idle.pop()
            conn.in_pool = False
            transport = conn.transport
            if conn.eof or transport is None or transport.is_closing() or now - conn.idle_since > expiry:
                conn.close()
            elif conn.poller is not None and _readable(conn.poller):
                conn.close()  # an idle HTTP/1.1 connection has nothing to say but goodbye
            else:
                return conn
        return None

    def release(self, conn: _Connection, now: float) -> None:
        """Take back a connection whose response is complete on the wire."""
        conn.active = False
        conn.idle_since = now
        if conn.reading_paused:
            conn.resume()  # an idle connection must keep reading, or its EOF goes unnoticed
        conn.in_pool = True
        self.idle.append(conn)
        self.wake_one()


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: the protocol, the response parser and one response's state.

    The task that owns the connection waits on ``waiter``; every protocol event (head, body,
    end, EOF, loss, writability) wakes it, and it re-checks the state it waits for.
    """

    __slots__ = (
        "active",
        "buffered",
        "chunks",
        "dropped",
        "eof",
        "error",
        "head_only",
        "headers",
        "headers_done",
        "idle_since",
        "in_pool",
        "keep_alive",
        "loop",
        "max_buffered",
        "message_done",
        "parser",
        "poller",
        "pool",
        "reading_paused",
        "status",
        "timers",
        "transport",
        "waiter",
        "writing_paused",
    )

    def __init__(self, pool: _Pool, loop: asyncio.AbstractEventLoop, max_buffered: int, timers: CoarseTimers) -> None:
        self.pool = pool
        self.loop = loop
        self.timers = timers  # the read and write deadlines of wait()
        self.max_buffered = max_buffered
        self.transport: asyncio.Transport | None = None
        self.poller: select.poll | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.active = False
        self.in_pool = False
        self.dropped = False
        self.eof = False
        self.reading_paused = False
        self.writing_paused = False
        self.idle_since = 0.0
        self._reset(head_only=False, keep_alive=True)

    def _reset(self, *, head_only: bool, keep_alive: bool) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.message_done = False
        self.keep_alive = keep_alive
        self.head_only = head_only
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.error: httpx.TransportError | None = None

    # -- asyncio protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass it
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # poll, not select: file descriptors above FD_SETSIZE are common in a busy gateway.
            self.poller = select.poll()
            self.poller.register(sock.fileno(), select.POLLIN)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                # Small request heads must not wait for the previous segment's ACK (Nagle).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.active:
            self.close()  # nothing was asked: bytes on an idle connection are garbage or a goodbye
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("the server switched protocols (unsupported)"))
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed HTTP response ({type(exc).__name__})"))

    def eof_received(self) -> bool:
        self._on_eof(None)
        return False  # close the transport: HTTP/1.1 has no use for a half-open connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_eof(exc)
        self.transport = None
        if self.in_pool:
            self.in_pool = False
            self.pool.idle.remove(self)
        self._drop()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake()

    # -- httptools callbacks --------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done:  # trailers of a chunked body come through here too: dropped
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.message_done:
            self.keep_alive = False  # bytes after the response: never reuse this connection
            return
        status = self.parser.get_status_code()
        if status < 200:
            self.headers = []  # 1xx informational: the real answer follows
            return
        self.status = status
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        self.headers_done = True
        if self.head_only:
            # httptools cannot be told a HEAD answer has no body, so the parser would wait for
            # content-length bytes: end the message here and never reuse the connection.
            self.message_done = True
            self.keep_alive = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.message_done:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > self.max_buffered and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.headers_done and not self.message_done:  # else the end of a 1xx or of a HEAD answer
            self.message_done = True
            self._wake()

    # -- state ----------------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, error: httpx.TransportError) -> None:
        if self.error is None and not self.message_done:
            self.error = error
        self.keep_alive = False
        self.close()
        self._wake()

    def _on_eof(self, exc: Exception | None) -> None:
        if self.eof:
            return
        self.eof = True
        self.keep_alive = False
        if not self.active or self.message_done or self.error is not None:
            self._wake()
            return
        if not self.headers_done:
            self.error = (
                httpx.ReadError(f"connection lost before the response ({type(exc).__name__})")
                if exc is not None
                else httpx.RemoteProtocolError("the server disconnected without sending a response")
            )
        elif exc is None and not self._framed():
            self.message_done = True  # a close-delimited body ends with the connection
        else:
            self.error = (
                httpx.ReadError(f"connection lost during the response body ({type(exc).__name__})")
                if exc is not None
                else httpx.RemoteProtocolError("the server closed the connection before the body was complete")
            )
        self._wake()

    def _framed(self) -> bool:
        """Whether the response declared its length (content-length or chunked) or has no body."""
        if self.status in (204, 304):
            return True
        return any(name.lower() in _FRAMING for name, _ in self.headers)

    def _drop(self) -> None:
        """Give the pool slot back, exactly once."""
        if not self.dropped:
            self.dropped = True
            pool = self.pool
            pool.size -= 1
            pool.conns.discard(self)
            pool.wake_one()

    def close(self) -> None:
        """Close the socket and free the pool slot (idempotent)."""
        self.eof = True
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()
        self._drop()

    def resume(self) -> None:
        self.reading_paused = False
        if self.transport is not None:
            self.transport.resume_reading()

    async def wait(self, timeout: float | None, error: type[httpx.TimeoutException], message: str) -> None:
        """Sleep until the next protocol event; raise ``error`` after ``timeout`` seconds of silence."""
        waiter = self.waiter = self.loop.create_future()
        if timeout is None:
            try:
                await waiter
            finally:
                self.waiter = None
            return
        timer = self.timers.call_at(self.loop, self.loop.time() + timeout, _expire, waiter, error, message)
        try:
            await waiter
        finally:
            self.waiter = None
            timer.cancel()

    def send(self, data: bytes, *, head_only: bool, keep_alive: bool) -> None:
        self._reset(head_only=head_only, keep_alive=keep_alive)
        self.active = True
        assert self.transport is not None
        self.transport.write(data)

    async def receive_head(self, timeouts: Mapping[str, float | None]) -> None:
        """Wait for the status line and headers (or raise the error that ended the connection)."""
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            if self.eof:  # closed by us (cancelled elsewhere) with no error recorded
                raise httpx.RemoteProtocolError("the connection closed before the response")
            if self.writing_paused:
                await self.wait(timeouts.get("write"), httpx.WriteTimeout, "the upstream did not accept the request")
            else:
                await self.wait(timeouts.get("read"), httpx.ReadTimeout, "the upstream sent no response in time")

    def take(self) -> bytes:
        """Everything queued, as one bytes object; reading resumes if it was paused."""
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.reading_paused and not self.eof:
            self.resume()
        return data


class _ResponseBody(httpx.AsyncByteStream):
    """The body of one response, read straight off its connection.

    Iterating yields chunks as they arrive and, at the end of the message, hands the connection
    back to the pool (or closes it). :meth:`aclose` before that closes the connection.
    """

    __slots__ = ("_conn", "_timeout", "_transport")

    def __init__(self, transport: FastTransport, conn: _Connection, read_timeout: float | None) -> None:
        self._transport = transport
        self._conn: _Connection | None = conn
        self._timeout = read_timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        try:
            while True:
                if conn.chunks:
                    yield conn.take()
                    if self._conn is None:  # closed by the consumer between chunks
                        return
                elif conn.message_done:
                    self._finish(conn)
                    return
                elif conn.error is not None:
                    raise conn.error
                elif conn.eof:
                    raise httpx.ReadError("the connection was closed")
                else:
                    await conn.wait(self._timeout, httpx.ReadTimeout, "the upstream went silent")
        except BaseException:
            # A timeout, a broken connection, a cancelled or abandoned reader: never reuse it.
            if self._conn is not None:
                self._conn = None
                conn.close()
            raise

    def _finish(self, conn: _Connection) -> None:
        self._conn = None
        if conn.keep_alive and not conn.eof and not self._transport.closed:
            conn.pool.release(conn, conn.loop.time())
        else:
            conn.close()

    async def aclose(self) -> None:
        conn = self._conn
        if conn is None:
            return
        if conn.message_done and conn.error is None:
            self._finish(conn)  # complete on the wire: clean to reuse even if not all was read
        else:
            self._conn = None
            conn.close()


class FastTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio protocols with keep-alive pools; see the module docstring."""

    def __init__(
        self,
        *,
        max_connections: int = 100,
        keepalive_expiry: float = 15.0,
        max_buffered: int = 256 * 1024,
        ssl_context: ssl.SSLContext | None = None,
        timers: CoarseTimers | None = None,
    ) -> None:
        """``max_connections`` is per (scheme, host, port); ``max_buffered`` per response.

        ``ssl_context`` replaces the default verifying context (e.g. to trust a private CA).
        ``timers``: the read and write deadlines' timers (accounts/upstream/timers.py), shared
        with the process's other deadlines; else the transport's own.
        """
        self.timers = timers or CoarseTimers()
        self._max_connections = max_connections
        self._expiry = keepalive_expiry
        self._max_buffered = max_buffered
        self._ssl_context = ssl_context
        self._pools: dict[tuple[bytes, bytes], _Pool] = {}
        self.closed = False

    def _pool(self, url: httpx.URL, key: tuple[bytes, bytes]) -> _Pool:
        scheme = key[0]
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        if not url.raw_host:
            raise httpx.UnsupportedProtocol("the URL has no host")
        context = None
        if scheme == b"https":
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
                self._ssl_context.set_alpn_protocols(["http/1.1"])
            context = self._ssl_context
        host = url.raw_host.decode("ascii")
        pool = _Pool(
            host, url.port or _DEFAULT_PORTS[scheme], b"host: " + key[1] + b"\r\n", context, self._max_connections
        )
        self._pools[key] = pool
        return pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        key = (url.raw_scheme, url.netloc)
        pool = self._pools.get(key) or self._pool(url, key)
        timeouts: Mapping[str, float | None] = request.extensions.get("timeout") or _NO_TIMEOUTS
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        data, keep_alive = _encode(request, pool.host_line, body)

        conn = await self._acquire(pool, timeouts)
        try:
            conn.send(data, head_only=request.method == "HEAD", keep_alive=keep_alive)
            await conn.receive_head(timeouts)
        except BaseException:
            conn.close()
            raise
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_ResponseBody(self, conn, timeouts.get("read")),
            request=request,
        )

    async def _acquire(self, pool: _Pool, timeouts: Mapping[str, float | None]) -> _Connection:
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            now = loop.time()
            conn = pool.checkout(now, self._expiry)
            if conn is not None:
                return conn
            if pool.size < pool.max_size:
                pool.size += 1
                return await self._connect(pool, loop, timeouts.get("connect"))
            pool_timeout = timeouts.get("pool")
            if deadline is None and pool_timeout is not None:
                deadline = now + pool_timeout
            waiter: asyncio.Future[None] = loop.create_future()
            pool.waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                raise httpx.PoolTimeout("no upstream connection became free in time") from None
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    pool.wake_one()  # woken but leaving: pass the free slot on
                raise

    async def _connect(self, pool: _Pool, loop: asyncio.AbstractEventLoop, timeout: float | None) -> _Connection:
        """Open a connection for a slot already counted in ``pool.size``."""
        conn = _Connection(pool, loop, self._max_buffered, self.timers)
        pool.conns.add(conn)
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    lambda: conn,
                    pool.host,
                    pool.port,
                    ssl=pool.ssl,
                    server_hostname=pool.host if pool.ssl is not None else None,
                )
        except TimeoutError:
            conn.close()
            raise httpx.ConnectTimeout("the upstream did not accept a connection in time") from None
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
            conn.close()
            raise httpx.ConnectError(f"could not connect to the upstream ({type(exc).__name__})") from None
        except BaseException:
            conn.close()
            raise
        return conn

    async def aclose(self) -> None:
        """Close every connection; responses still being read fail with ``ReadError``.

        The transport stays usable afterwards but no longer keeps connections alive.
        """
        self.closed = True
        for pool in self._pools.values():
            pool.idle.clear()
            for conn in list(pool.conns):
                conn.in_pool = False
                conn.close()
        self._pools.clear()


def _encode(request: httpx.Request, host_line: bytes, body: bytes) -> tuple[bytes, bool]:
    """The request as it goes on the wire, and whether the connection may be kept afterwards."""
    method = request.method
    parts = [method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    lines = 1
    add_host = True
    keep_alive = True
    for name, value in request.headers.raw:
        lower = name.lower()
        if lower in _FRAMING:
            continue  # the body is in memory: its length is written below, always right
        if lower == b"host":
            add_host = False
        elif lower == b"connection" and b"close" in value.lower():
            keep_alive = False
        parts += (name, b": ", value, b"\r\n")
        lines += 1
    if add_host:
        parts.append(host_line)
        lines += 1
    if body or method in _BODY_METHODS:
        parts.append(b"content-length: %d\r\n\r\n" % len(body))
        lines += 2
    else:
        parts.append(b"\r\n")
        lines += 1
    parts.append(body)
    data = b"".join(parts)
    end = len(data) - len(body)
    # One CR and one LF per line: any other means a name or value carried one (header injection).
    if data.count(b"\n", 0, end) != lines or data.count(b"\r", 0, end) != lines:
        raise httpx.LocalProtocolError("a request header contains CR or LF")
    return data, keep_alive


__all__ = ["FastTransport"]
