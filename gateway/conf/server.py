"""The HTTP/1.1 protocol of ``manage.py serve``: uvicorn's httptools protocol plus the limits it lacks.

uvicorn 0.54 bounds open connections (``limit_concurrency``: a request beyond it is answered
503) and idle kept-alive connections (``timeout_keep_alive``), and both are set from the
settings by ``manage.py serve``. With httptools it accepts a request head of any size with
any number of header lines, and waits forever for a head or a body that trickles in (h11's
``h11_max_incomplete_event_size`` bounds only h11's buffer, and h11 is the slower parser).
:class:`LimitedHttpToolsProtocol` adds, per connection:

- head size: the request line and headers at most ``GATEWAY_MAX_HEADER_BYTES``. A head that
  is still incomplete past it is refused as it arrives, so a connection holds at most the
  limit plus one socket read; a complete head is measured exactly (names, values, separators).
- header count: at most ``GATEWAY_MAX_HEADERS`` lines.
  Both are answered ``431`` and the connection is closed.
- head timeout: a whole head within ``GATEWAY_HEADER_TIMEOUT`` seconds of the connection being
  made, or of the first byte of a later request on a kept-alive connection.
- body timeout: a whole body within ``GATEWAY_BODY_TIMEOUT`` seconds of the read that completed
  its head. The application then reads ``http.disconnect``.
  Both are answered ``408`` (a connection that never sent a byte is just closed) and closed.

It also tells a running request that its client left when that request was not the last one
the connection sent: uvicorn marks only the newest request (a pipelined one, still queued)
disconnected, so the one being served kept waiting for its upstream and then failed writing
to the closed transport (``RuntimeError``).

Answers are the OpenAI error envelope, as everywhere else. The timers cost nothing on the
common path: one per connection, cancelled when its first head is read; after that a timer
is armed only when a read ends inside a head or a body, so a request that arrives in one read
(almost all of them) arms none.

A response's head goes out with its first body message, in one ``writev`` (:class:`HeldHead`):
uvicorn writes the head on ``http.response.start`` and the body on ``http.response.body``, two
system calls and two TCP segments for every JSON answer.

Daphne (``manage.py serve --server daphne``) does not use this protocol: Twisted's own limits
apply there (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from functools import cache
from typing import Any

from django.conf import settings
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from gateway.contract.errors import GatewayError

HEADER_SEPARATORS = 4  # ": " and CRLF around each name and value


@dataclass(frozen=True, slots=True)
class HeadLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout: float
    body_timeout: float


@cache
def head_limits() -> HeadLimits:
    return HeadLimits(
        max_header_bytes=settings.GATEWAY_MAX_HEADER_BYTES,
        max_headers=settings.GATEWAY_MAX_HEADERS,
        header_timeout=settings.GATEWAY_HEADER_TIMEOUT,
        body_timeout=settings.GATEWAY_BODY_TIMEOUT,
    )


class Reading(enum.Enum):
    HEAD = "head"  # a new connection, or a request whose head is incomplete
    BODY = "body"  # a request whose head is read and whose body is not
    NOTHING = "nothing"  # the request is read: the application has it (uvicorn's keep-alive timer takes over)


class HeadRefused(Exception):
    """Raised in a parser callback: the request is answered ``refusal`` instead of uvicorn's 400."""


def _refusal(status: int, message: str, code: str) -> bytes:
    body = GatewayError(status, message, code=code).body()
    return b"".join(
        (
            STATUS_LINE[status],
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body),
            body,
        )
    )


class HeldHead:
    """The transport of one request's cycle, holding the response's head until its first body write.

    uvicorn's cycle writes the status line and headers, then each body message, each with its
    own ``transport.write``: a JSON answer cost two system calls and two TCP segments. Given to
    the cycle in place of the connection's transport, this holds the head (the first write that
    starts a status line other than ``100 Continue``) and writes it with the next write, or
    before a close, in one ``writelines`` (one ``writev``). The application always sends a body
    message after the start (uvicorn closes the connection if it ends without one), so a head
    waits only while the application prepares its first body bytes. A ``HEAD`` request's
    cycle is not given one: uvicorn writes no body for it, so its head would wait forever.

    Measured under ``make bench`` (docs/performance.md, "The gap to 064532d, closed").
    """

    __slots__ = ("_head", "_started", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._head: bytes | None = None
        self._started = False

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self.transport.writelines((head, data))
        elif not self._started and data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 100 "):
            self._started = True
            self._head = data
        else:
            self.transport.write(data)

    def close(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self.transport.write(head)
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head size and count limits and head and body timeouts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = head_limits()
        self.reading = Reading.HEAD
        self._head_begun = False  # a byte of the current head has arrived
        self._begun_in_this_read = False
        self._head_bytes = 0  # bytes of reads made wholly inside the current head
        self._deadline: asyncio.TimerHandle | None = None
        self._refusal: bytes | None = None
        self._serving: RequestResponseCycle | None = None  # the request whose application runs

    # -- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        serving = self._serving
        if serving is not None and not serving.response_complete and not serving.disconnected:
            serving.disconnected = True  # its receive() now answers http.disconnect
            serving.message_event.set()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._serving = cycle
        # A HEAD answer has no body write (uvicorn skips it): its head must go out unheld.
        if cycle.scope["method"] != "HEAD":
            cycle.transport = HeldHead(cycle.transport)  # type: ignore[assignment]
        super()._start_asgi_task(cycle, app)

    def data_received(self, data: bytes) -> None:
        self._begun_in_this_read = False
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.reading is Reading.HEAD and self._head_begun:
            # The read that began a head may also hold the end of the previous request: it is
            # not counted, so a head is never over-measured (and at most one read under).
            if not self._begun_in_this_read:
                self._head_bytes += len(data)
                if self._head_bytes > self.limits.max_header_bytes:
                    self._refuse(self._too_large())
                    return
            if self._deadline is None:
                self._arm(self.limits.header_timeout)
        elif self.reading is Reading.BODY and self._deadline is None:
            self._arm(self.limits.body_timeout)

    # -- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.reading = Reading.HEAD
        self._head_begun = self._begun_in_this_read = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._disarm()
        if len(self.headers) > self.limits.max_headers:
            self._refusal = _refusal(
                431,
                f"The request has more than {self.limits.max_headers} header lines.",
                "request_header_fields_too_large",
            )
            raise HeadRefused
        size = len(self.url) + sum(len(name) + len(value) + HEADER_SEPARATORS for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            self._refusal = self._too_large()
            raise HeadRefused
        self.reading = Reading.BODY
        self._head_begun = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.reading = Reading.NOTHING
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error, or ours when a callback refused the head."""
        refusal, self._refusal = self._refusal, None
        if refusal is None:
            super().send_400_response(msg)
        else:
            self._refuse(refusal)

    # -- limits -------------------------------------------------------------------------------

    def _too_large(self) -> bytes:
        return _refusal(
            431,
            f"The request head (request line and headers) is larger than {self.limits.max_header_bytes} bytes.",
            "request_header_fields_too_large",
        )

    def _refuse(self, response: bytes) -> None:
        """Answer ``response`` (unless a response to this request was begun) and close."""
        self._disarm()
        cycle: RequestResponseCycle | None = self.cycle
        answer: bytes | None = response
        if cycle is not None and not cycle.response_complete:
            # The application holds the request: it reads http.disconnect and its sends are dropped.
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                answer = None
        elif cycle is not None and self.reading is Reading.BODY:
            answer = None  # this request was answered before its body arrived (e.g. 413)
        self.reading = Reading.NOTHING
        if answer is not None:
            self.transport.write(answer)
        self.transport.close()

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.pipeline:
            # A request queued behind a response in progress: the server is not reading, the client is not slow.
            self._arm(self.limits.body_timeout if self.reading is Reading.BODY else self.limits.header_timeout)
        elif self.reading is Reading.BODY:
            seconds = self.limits.body_timeout
            self._refuse(_refusal(408, f"The request body did not arrive within {seconds:g} s.", "request_timeout"))
        elif self.reading is Reading.HEAD and self.cycle is not None and not self.cycle.response_complete:
            self._arm(self.limits.header_timeout)  # a pipelined head waits behind a response: not its fault
        elif self.reading is Reading.HEAD and self._head_begun:
            seconds = self.limits.header_timeout
            self._refuse(_refusal(408, f"The request head did not arrive within {seconds:g} s.", "request_timeout"))
        elif self.reading is Reading.HEAD:
            self.transport.close()  # connected and silent: nobody to answer
