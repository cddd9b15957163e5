"""FastTransport (accounts/upstream/transport.py) and the transport choice in accounts/upstream/client.py.

Real sockets only: the project's fake upstream as a subprocess (the ``fake_upstream`` fixture) and
small scripted servers running in the test's own event loop for the edge cases. No database.
Each test runs its coroutine with ``asyncio.run`` (or uvloop, where the loop matters).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from accounts.upstream.client import (
    TRANSPORTS,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from accounts.upstream.transport import FastTransport
from tests.conftest import FakeUpstream

T = TypeVar("T")
LOOPS = ["asyncio", "uvloop"]


def run(coro: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    return uvloop.run(coro) if loop == "uvloop" else asyncio.run(coro)


def timeouts(read: float = 2.0, pool: float = 2.0) -> dict[str, Any]:
    return {"timeout": httpx.Timeout(2.0, read=read, pool=pool).as_dict()}


def get(url: str, **kwargs: Any) -> httpx.Request:
    return httpx.Request("GET", url, extensions=timeouts(**kwargs))


def post(url: str, content: bytes = b"{}", **kwargs: Any) -> httpx.Request:
    return httpx.Request("POST", url, content=content, extensions=timeouts(**kwargs))


def refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------------
# A scripted HTTP/1.1 server in the test's loop
# ---------------------------------------------------------------------------------------------------

Handler = Callable[["Server", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """Runs ``handler`` per connection; counts connections and keeps every raw request."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.connections = 0
        self.requests: list[bytes] = []
        self.client_closed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}/v1/responses"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # cancelled by __aexit__; a cancelled handler task would be logged as an error
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One whole request (head and content-length body), or None at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        raw = head + await reader.readexactly(length)
        self.requests.append(raw)
        return raw

    async def wait_client_eof(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass
        self.client_closed.set()


def reply(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def keep_alive_ok(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await server.read_request(reader) is not None:
        writer.write(reply())


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def read_all(response: httpx.Response) -> list[bytes]:
    return [piece async for piece in response.aiter_raw()]


async def collect(pieces: AsyncIterator[bytes], into: list[bytes]) -> None:
    """Append every piece to ``into``, so what came before an exception stays visible."""
    async for piece in pieces:
        into.append(piece)


# ---------------------------------------------------------------------------------------------------
# Against the project's fake upstream
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_json_and_sse_from_the_fake_upstream_on_one_connection(fake_upstream: FakeUpstream, loop: str) -> None:
    url = fake_upstream.base_url + "/responses"

    async def scenario() -> tuple[httpx.Response, bytes, bytes, int]:
        transport = FastTransport()
        body = orjson.dumps({"model": "gpt-4.1", "input": "hi"})
        plain = await transport.handle_async_request(post(url, body))
        content = await plain.aread()
        sse_body = orjson.dumps({"model": "gpt-4.1", "input": "hi", "stream": True})
        stream = await transport.handle_async_request(post(url, sse_body))
        events = b"".join(await read_all(stream))
        pool = next(iter(transport._pools.values()))
        idle = len(pool.idle) if pool.size == 1 else -1  # one connection served both
        await transport.aclose()
        return stream, content, events, idle

    stream, content, events, idle = run(scenario(), loop)
    assert orjson.loads(content)["status"] == "completed"
    assert stream.status_code == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert events.rstrip().endswith(b"}")
    assert b"event: response.completed" in events
    assert idle == 1
    sent = fake_upstream.last_request()
    assert sent["headers"]["host"] == url.split("/")[2]
    assert sent["headers"]["content-length"] == str(len(orjson.dumps(sent["body"])))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_each_transport_relays_through_upstream_client(fake_upstream: FakeUpstream, transport: str) -> None:
    url = fake_upstream.base_url + "/responses"
    headers = httpx.Headers({"content-type": "application/json", "authorization": "Bearer sk-test-transport"})

    async def scenario() -> tuple[int, bytes, bytes]:
        client = UpstreamClient(transport=transport, read_timeout=5.0)
        try:
            reply_ = await client.post(url, headers, orjson.dumps({"model": "gpt-4.1", "input": "hi"}))
            stream = await client.open(url, headers, orjson.dumps({"model": "gpt-4.1", "stream": True}))
            try:
                events = b"".join([piece async for piece in stream.chunks()])
            finally:
                await stream.aclose()
            return reply_.status, reply_.content, events
        finally:
            await client.aclose()

    status, content, events = run(scenario(), "uvloop")
    assert status == 200
    assert orjson.loads(content)["object"] == "response"
    assert b"event: response.completed" in events
    sent = fake_upstream.last_request()
    assert sent["body"] == {"model": "gpt-4.1", "stream": True}
    assert sent["headers"]["authorization"] == "Bearer sk-test-transport"
    assert sent["headers"]["content-length"] == str(len(orjson.dumps(sent["body"])))
    assert sent["headers"]["host"] == url.split("/")[2]


def test_an_unknown_transport_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown upstream transport"):
        UpstreamClient(transport="requests")


def test_upstream_faults_translate_through_the_fast_transport(fake_upstream: FakeUpstream) -> None:
    url = fake_upstream.base_url + "/responses"
    headers = httpx.Headers({"content-type": "application/json"})

    def body(stream: bool = False, **metadata: str) -> bytes:
        return orjson.dumps({"model": "gpt-4.1", "input": "hi", "stream": stream, "metadata": metadata})

    async def scenario() -> dict[str, Any]:
        client = UpstreamClient(transport="fast", read_timeout=0.3)
        seen: dict[str, Any] = {}
        try:
            seen["status"] = (await client.post(url, headers, body(fake_status="429"))).status
            with pytest.raises(UpstreamProtocolError):
                await client.post(url, headers, body(fake_cut_after="0"))
            with pytest.raises(UpstreamTimeout):
                await client.post(url, headers, body(fake_hang="1"))
            stream = await client.open(url, headers, body(True, fake_cut_after="3"))
            got: list[bytes] = []
            with pytest.raises(UpstreamProtocolError):
                await collect(stream.chunks(), got)
            await stream.aclose()
            seen["before_cut"] = b"".join(got).count(b"event: ")
            stream = await client.open(url, headers, body(True, fake_event_delay_ms="30"))
            arrivals = [time.monotonic() async for _ in stream.chunks()]
            await stream.aclose()
            seen["arrivals"] = arrivals
            seen["ok_after_faults"] = (await client.post(url, headers, body())).status
        finally:
            await client.aclose()
        refused = UpstreamClient(transport="fast")
        with pytest.raises(UpstreamConnectError):
            await refused.post(f"http://127.0.0.1:{refused_port()}/v1/responses", headers, body())
        return seen

    seen = run(scenario())
    assert seen["status"] == 429
    assert seen["before_cut"] == 3
    # Events 30 ms apart arrive as separate chunks spread over time, not as one buffered body.
    assert len(seen["arrivals"]) >= 4
    assert seen["arrivals"][-1] - seen["arrivals"][0] >= 0.06
    assert seen["ok_after_faults"] == 200


# ---------------------------------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------------------------------


def test_chunked_body_split_at_awkward_boundaries_with_trailers() -> None:
    payload = b"hello" + bytes(range(65, 91))
    wire = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
        + chunk(payload[:5])
        + chunk(payload[5:])
        + b"0\r\nx-trailer: dropped\r\n\r\n"
    )

    async def awkward(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(reader) is not None:
            sizes, at = [1, 2, 3, 5, 8, 13], 0
            while at < len(wire):  # every boundary lands somewhere odd: in a name, a size, a CRLF
                size = sizes[at % len(sizes)]
                writer.write(wire[at : at + size])
                at += size
                await writer.drain()
                await asyncio.sleep(0.001)

    async def scenario() -> tuple[list[bytes], httpx.Response, int, int]:
        async with Server(awkward) as server:
            transport = FastTransport()
            response = await transport.handle_async_request(get(server.url))
            bodies = [b"".join(await read_all(response))]
            again = await transport.handle_async_request(get(server.url))
            bodies.append(await again.aread())
            await transport.aclose()
            return bodies, response, server.connections, len(server.requests)

    bodies, response, connections, requests = run(scenario())
    assert bodies == [payload, payload]
    assert "x-trailer" not in response.headers
    assert response.headers["transfer-encoding"] == "chunked"
    assert (connections, requests) == (1, 2)  # the trailers did not spoil the connection


def test_close_delimited_body_ends_with_the_connection() -> None:
    async def close_delimited(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"part two")

    async def scenario() -> tuple[bytes, bytes, int]:
        async with Server(close_delimited) as server:
            transport = FastTransport()
            first = await (await transport.handle_async_request(get(server.url))).aread()
            second = await (await transport.handle_async_request(get(server.url))).aread()
            await transport.aclose()
            return first, second, server.connections

    first, second, connections = run(scenario())
    assert first == second == b"part one, part two"
    assert connections == 2


def test_connection_close_answer_is_not_reused() -> None:
    async def says_close(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Says "close" but keeps answering: only the client's discipline decides reuse.
        while await server.read_request(reader) is not None:
            writer.write(reply(extra=b"connection: close\r\n"))

    async def scenario() -> tuple[list[bytes], int, int]:
        async with Server(says_close) as server:
            transport = FastTransport()
            bodies = [await (await transport.handle_async_request(get(server.url))).aread() for _ in range(2)]
            idle = sum(len(pool.idle) for pool in transport._pools.values())
            await transport.aclose()
            return bodies, server.connections, idle

    bodies, connections, idle = run(scenario())
    assert bodies == [b"ok", b"ok"]
    assert connections == 2
    assert idle == 0


def test_informational_answer_is_skipped() -> None:
    async def early_hints(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n" + reply(b"final"))

    async def scenario() -> tuple[httpx.Response, list[bytes], int]:
        async with Server(early_hints) as server:
            transport = FastTransport()
            response = await transport.handle_async_request(get(server.url))
            bodies = [await response.aread()]
            bodies.append(await (await transport.handle_async_request(get(server.url))).aread())
            await transport.aclose()
            return response, bodies, server.connections

    response, bodies, connections = run(scenario())
    assert response.status_code == 200
    assert "link" not in response.headers
    assert bodies == [b"final", b"final"]
    assert connections == 1


def test_request_head_has_one_host_and_the_true_content_length() -> None:
    async def scenario() -> list[bytes]:
        async with Server(keep_alive_ok) as server:
            transport = FastTransport()
            # The lean form UpstreamClient uses: no Host, a lying content-length, a stray chunked.
            lean = httpx.Request(
                "POST",
                server.url,
                headers=httpx.Headers({"content-length": "999", "transfer-encoding": "chunked", "x-a": "1"}),
                stream=httpx.ByteStream(b"abc"),
                extensions=timeouts(),
            )
            await (await transport.handle_async_request(lean)).aread()
            await (await transport.handle_async_request(post(server.url, b"hello"))).aread()
            await transport.aclose()
            return server.requests

    lean, full = run(scenario())
    for raw, body in ((lean, b"abc"), (full, b"hello")):
        head, sent = raw.split(b"\r\n\r\n", 1)
        lines = head.lower().split(b"\r\n")
        assert lines[0] == b"post /v1/responses http/1.1"
        assert sum(line.startswith(b"host: 127.0.0.1:") for line in lines) == 1
        assert [line for line in lines if line.startswith((b"content-length", b"transfer-encoding"))] == [
            b"content-length: %d" % len(body)
        ]
        assert sent == body
    assert b"x-a: 1" in lean


def test_header_with_crlf_is_refused_before_connecting() -> None:
    async def scenario() -> int:
        async with Server(keep_alive_ok) as server:
            transport = FastTransport()
            request = httpx.Request("GET", server.url, headers={"x-evil": "a\r\nx-injected: 1"})
            with pytest.raises(httpx.LocalProtocolError):
                await transport.handle_async_request(request)
            await transport.aclose()
            return server.connections

    assert run(scenario()) == 0


def test_malformed_answer_is_a_protocol_error() -> None:
    async def garbage(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 2xx Bogus\r\n\r\n")
        await asyncio.sleep(1)

    async def scenario() -> None:
        async with Server(garbage) as server:
            transport = FastTransport()
            with pytest.raises(httpx.RemoteProtocolError):
                await transport.handle_async_request(get(server.url))
            await transport.aclose()

    run(scenario())


# ---------------------------------------------------------------------------------------------------
# Streaming, flow control, early close
# ---------------------------------------------------------------------------------------------------


def test_first_chunk_arrives_before_the_second_is_sent() -> None:
    got_first = asyncio.Event()
    sent_second: list[bool] = []

    async def two_chunks(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"first"))
        await writer.drain()
        try:
            await asyncio.wait_for(got_first.wait(), 2.0)
        finally:
            sent_second.append(True)
            writer.write(chunk(b"second") + b"0\r\n\r\n")
        await server.read_request(reader)

    async def scenario() -> list[tuple[bytes, bool]]:
        async with Server(two_chunks) as server:
            transport = FastTransport()
            response = await transport.handle_async_request(get(server.url))
            seen = []
            async for piece in response.aiter_raw():
                seen.append((piece, bool(sent_second)))
                got_first.set()
            await transport.aclose()
            return seen

    assert run(scenario()) == [(b"first", False), (b"second", True)]


def test_slow_reader_pauses_the_socket_instead_of_buffering() -> None:
    size, limit = 4 * 1024 * 1024, 64 * 1024

    async def firehose(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
            block = b"x" * 65536
            for _ in range(size // len(block)):
                writer.write(block)
                await writer.drain()

    async def scenario() -> tuple[bool, int, int, int]:
        async with Server(firehose) as server:
            transport = FastTransport(max_buffered=limit)
            response = await transport.handle_async_request(get(server.url))
            pieces = response.aiter_raw()
            total = len(await anext(pieces))
            await asyncio.sleep(0.2)  # a slow client: the upstream keeps sending meanwhile
            conn = response.stream._conn  # type: ignore[union-attr]
            paused, queued = conn.reading_paused, conn.buffered
            async for piece in pieces:
                total += len(piece)
            again = await (await transport.handle_async_request(get(server.url))).aread()
            await transport.aclose()
            return paused, queued, total + len(again), server.connections

    paused, queued, total, connections = run(scenario())
    assert paused
    assert queued <= limit + 256 * 1024  # the limit plus at most one socket read
    assert total == 2 * size
    assert connections == 1


def test_early_close_closes_the_connection_instead_of_pooling_it() -> None:
    async def endless(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await server.read_request(reader) is None:
            return
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"data: 1\n\n"))
        await server.wait_client_eof(reader)

    async def scenario() -> tuple[bytes, int, int]:
        async with Server(endless) as server:
            transport = FastTransport()
            response = await transport.handle_async_request(get(server.url))
            first = await anext(response.aiter_raw())
            await response.aclose()  # the gateway's client went away mid-stream
            await asyncio.wait_for(server.client_closed.wait(), 2.0)
            idle = sum(len(pool.idle) for pool in transport._pools.values())
            await transport.handle_async_request(get(server.url))  # needs a new connection
            await transport.aclose()
            return first, idle, server.connections

    first, idle, connections = run(scenario())
    assert first == b"data: 1\n\n"
    assert idle == 0
    assert connections == 2


# ---------------------------------------------------------------------------------------------------
# Stale connections, timeouts, connect failures
# ---------------------------------------------------------------------------------------------------


def test_idle_connection_closed_by_the_server_is_replaced() -> None:
    async def one_then_hang_up(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await server.read_request(reader) is not None:
            writer.write(reply())
            await writer.drain()
            await asyncio.sleep(0.02)  # then the idle keep-alive connection is closed by the server

    async def scenario() -> tuple[list[bytes], int, int]:
        async with Server(one_then_hang_up) as server:
            transport = FastTransport()
            bodies = [await (await transport.handle_async_request(post(server.url))).aread()]
            await asyncio.sleep(0.1)
            bodies.append(await (await transport.handle_async_request(post(server.url))).aread())
            await transport.aclose()
            return bodies, server.connections, len(server.requests)

    bodies, connections, requests = run(scenario())
    assert bodies == [b"ok", b"ok"]
    assert (connections, requests) == (2, 2)  # each POST was sent exactly once


@pytest.mark.parametrize("loop", LOOPS)
def test_hang_up_the_loop_has_not_seen_yet_is_caught_at_checkout(loop: str) -> None:
    """The server's FIN sits in the kernel, unprocessed, when the next request picks the connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    requests: list[bytes] = []

    def serve() -> None:
        for _ in range(2):
            conn, _addr = listener.accept()
            with conn:
                data = b""
                while not data.endswith(b"{}"):
                    data += conn.recv(65536)
                requests.append(data)
                conn.sendall(reply())
                time.sleep(0.02)
            # closing (FIN) while the client's loop is blocked below

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    async def scenario() -> list[bytes]:
        transport = FastTransport()
        url = f"http://127.0.0.1:{port}/v1/responses"
        bodies = [await (await transport.handle_async_request(post(url))).aread()]
        time.sleep(0.15)  # noqa: ASYNC251 - blocks the loop on purpose: the FIN stays unprocessed
        bodies.append(await (await transport.handle_async_request(post(url))).aread())
        await transport.aclose()
        return bodies

    try:
        assert run(scenario(), loop) == [b"ok", b"ok"]
    finally:
        thread.join(2)
        listener.close()
    assert len(requests) == 2


def test_hang_up_after_the_request_was_sent_is_not_retried() -> None:
    async def read_and_hang_up(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)

    async def scenario() -> tuple[int, int]:
        async with Server(read_and_hang_up) as server:
            transport = FastTransport()
            with pytest.raises(httpx.RemoteProtocolError):
                await transport.handle_async_request(post(server.url))
            await transport.aclose()
            return server.connections, len(server.requests)

    assert run(scenario()) == (1, 1)


def test_read_timeout_before_the_answer_and_between_chunks() -> None:
    async def silent(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        if len(server.requests) == 2:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"first"))
        await asyncio.sleep(10)

    async def scenario() -> tuple[float, bytes, float]:
        async with Server(silent) as server:
            transport = FastTransport()
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await transport.handle_async_request(get(server.url, read=0.2))
            before_head = time.monotonic() - started
            response = await transport.handle_async_request(get(server.url, read=0.2))
            pieces = response.aiter_raw()
            first = await anext(pieces)
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await anext(pieces)
            between = time.monotonic() - started
            await response.aclose()
            await transport.aclose()
            return before_head, first, between

    before_head, first, between = run(scenario())
    assert 0.15 < before_head < 1.0
    assert first == b"first"
    assert 0.15 < between < 1.0


def test_refused_port_is_a_connect_error() -> None:
    async def scenario() -> None:
        transport = FastTransport()
        with pytest.raises(httpx.ConnectError):
            await transport.handle_async_request(get(f"http://127.0.0.1:{refused_port()}/"))
        with pytest.raises(httpx.UnsupportedProtocol):
            await transport.handle_async_request(get("ftp://127.0.0.1/"))
        await transport.aclose()

    run(scenario())


def test_full_pool_waits_then_times_out() -> None:
    async def endless(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await server.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            await server.wait_client_eof(reader)

    async def scenario() -> int:
        async with Server(endless) as server:
            transport = FastTransport(max_connections=1)
            busy = await transport.handle_async_request(get(server.url))
            with pytest.raises(httpx.PoolTimeout):
                await transport.handle_async_request(get(server.url, pool=0.1))
            waiting = asyncio.create_task(transport.handle_async_request(get(server.url)))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            await busy.aclose()  # frees the slot: the waiting request gets its own connection
            response = await asyncio.wait_for(waiting, 2.0)
            assert response.status_code == 200
            await response.aclose()
            await transport.aclose()
            return server.connections

    assert run(scenario()) == 2


# ---------------------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.mark.parametrize("loop", LOOPS)
def test_tls_with_a_trusted_self_signed_certificate(tmp_path: Path, loop: str) -> None:
    cert_path, key_path = self_signed(tmp_path)
    server_names: list[str | None] = []

    def record_sni(sock: Any, name: str | None, context: Any) -> None:
        server_names.append(name)

    async def scenario() -> tuple[list[bytes], int]:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert_path, key_path)
        server_ctx.sni_callback = record_sni
        async with Server(keep_alive_ok, ssl_context=server_ctx) as server:
            url = f"https://localhost:{server.port}/v1/responses"
            with pytest.raises(httpx.ConnectError):  # the default context verifies: untrusted
                await FastTransport().handle_async_request(post(url))
            trusting = FastTransport(ssl_context=ssl.create_default_context(cafile=str(cert_path)))
            bodies = [await (await trusting.handle_async_request(post(url))).aread() for _ in range(2)]
            await trusting.aclose()
            return bodies, server.connections

    bodies, connections = run(scenario(), loop)
    assert bodies == [b"ok", b"ok"]
    assert connections == 1  # both requests on one connection (a failed handshake never counts)
    assert server_names == ["localhost", "localhost"]  # SNI in the refused handshake and the good one
