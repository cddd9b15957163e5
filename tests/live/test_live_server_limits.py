"""Server limits of `manage.py serve` over real sockets (issue 10, item 5).

Hostile clients against a live gateway process: huge and numerous request headers, heads
and bodies that trickle in (slowloris), more connections than allowed. Each must end in a
refusal without the process growing, while well-behaved requests (pipelined ones, bodies
larger than a socket read) keep working. Timeouts are set short in the gateway under test;
the bounds the tests allow are several times larger, so load on the machine cannot fail them.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import harness as live
from tests.conftest import MODEL, Live

pytestmark = pytest.mark.live

LIMITS = {
    "GATEWAY_MAX_HEADER_BYTES": "32768",
    "GATEWAY_MAX_HEADERS": "100",
    "GATEWAY_HEADER_TIMEOUT": "1",
    "GATEWAY_BODY_TIMEOUT": "1",
    "GATEWAY_KEEP_ALIVE_TIMEOUT": "1",
}
SLACK = 15.0  # seconds a test waits for something due after about one


@pytest.fixture
def limited(live_gw: Live, start_gateway: Callable[..., live.LiveProcess]) -> live.LiveProcess:
    return start_gateway(**LIMITS)


def port_of(process: live.LiveProcess) -> int:
    return int(process.url.rsplit(":", 1)[1])


def connect(process: live.LiveProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port_of(process)), timeout=SLACK)
    return sock


def read_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (b"" if it reset the connection)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def error_of(answer: bytes) -> dict[str, Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return dict(json.loads(body)["error"])


def request(path: str = "/healthz", headers: bytes = b"", method: bytes = b"GET") -> bytes:
    return method + b" " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def healthy(process: live.LiveProcess) -> bool:
    with connect(process) as sock:
        sock.sendall(request(headers=b"Connection: close\r\n"))
        return status_of(read_answer(sock)) == 200


# --- header size and count -------------------------------------------------------------------


def test_endless_headers_are_cut_off_and_memory_stays_flat(limited: live.LiveProcess) -> None:
    """16 connections each trying to send a 32 MiB header line (the reported attack: 128 -> 742 MB RSS)."""
    assert limited.proc is not None
    pid = limited.proc.pid
    before = rss_mib(pid)
    peak = before
    outcomes: list[int] = []  # bytes each connection managed to send before the server cut it off
    chunk = b"a" * 65536

    def attack() -> None:
        sent = 0
        with connect(limited) as sock:
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
                while sent < 32 << 20:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass
        outcomes.append(sent)

    threads = [threading.Thread(target=attack) for _ in range(16)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, rss_mib(pid))
        time.sleep(0.02)
    assert len(outcomes) == 16
    assert all(sent < 32 << 20 for sent in outcomes), outcomes  # every one was cut off
    assert peak - before < 64, (before, peak)  # unbounded buffering grew it by hundreds of MiB
    assert healthy(limited)


def test_a_head_over_the_size_limit_is_431(limited: live.LiveProcess) -> None:
    with connect(limited) as sock:  # one complete head, a little over the limit, in one read
        sock.sendall(request(headers=b"X-Big: " + b"a" * 33000 + b"\r\n"))
        answer = read_answer(sock)
    assert status_of(answer) == 431
    error = error_of(answer)
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_header_fields_too_large")
    with connect(limited) as sock:  # under the limit: served
        sock.sendall(request(headers=b"X-Big: " + b"a" * 30000 + b"\r\nConnection: close\r\n"))
        assert status_of(read_answer(sock)) == 200


def test_an_8_mib_header_is_refused(limited: live.LiveProcess) -> None:
    with connect(limited) as sock:
        try:
            sock.sendall(request(headers=b"X-Big: " + b"a" * (8 << 20) + b"\r\n"))
        except OSError:
            pass  # cut off while sending: refused
        else:
            answer = read_answer(sock)
            assert answer == b"" or status_of(answer) == 431  # 431, or reset with the rest unread
    assert healthy(limited)


def test_too_many_header_lines_are_431(limited: live.LiveProcess) -> None:
    with connect(limited) as sock:
        sock.sendall(request(headers=b"".join(b"X-%d: v\r\n" % i for i in range(10_000))))
        answer = read_answer(sock)
    assert status_of(answer) == 431
    assert error_of(answer)["code"] == "request_header_fields_too_large"
    with connect(limited) as sock:
        sock.sendall(request(headers=b"".join(b"X-%d: v\r\n" % i for i in range(90)) + b"Connection: close\r\n"))
        assert status_of(read_answer(sock)) == 200


# --- read timeouts ---------------------------------------------------------------------------


def test_a_trickling_head_is_408(limited: live.LiveProcess) -> None:
    """Slowloris: a header line every 0.2 s never completes the head."""
    with connect(limited) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        sock.settimeout(0.2)
        answer = b""
        while time.monotonic() - started < SLACK and not answer:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
        sock.settimeout(SLACK)
        answer += read_answer(sock)
    assert status_of(answer) == 408
    assert error_of(answer)["code"] == "request_timeout"


def test_a_silent_connection_is_closed(limited: live.LiveProcess) -> None:
    with connect(limited) as sock:
        assert read_answer(sock) == b""  # closed by the server well before SLACK


def test_a_trickling_body_is_408_and_recorded_as_a_disconnect(live_gw: Live, limited: live.LiveProcess) -> None:
    from tenancy.models import UsageRecord

    body = json.dumps({"model": MODEL, "input": "hi"}).encode()
    head = request(
        "/v1/responses",
        b"Authorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        % (live_gw.owner.key.encode(), len(body)),
        b"POST",
    )
    with connect(limited) as sock:
        sock.sendall(head + body[:5])
        answer = read_answer(sock)
    assert status_of(answer) == 408
    assert error_of(answer)["code"] == "request_timeout"
    # The application read a disconnect: the key's request is on record, nothing was sent upstream.
    record = live.poll(
        lambda: UsageRecord.objects.filter(api_key=live_gw.owner.api_key).first(), what="the usage record"
    )
    assert record is not None
    assert (record.status_code, record.outcome, record.account_id) == (499, "client_disconnected", None)


def test_idle_kept_alive_connections_are_closed(limited: live.LiveProcess) -> None:
    with connect(limited) as sock:
        sock.sendall(request())
        answer = b""
        while not answer.endswith(b'"ok"}'):  # the whole answer, however the reads split it
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        assert read_answer(sock) == b""  # closed after GATEWAY_KEEP_ALIVE_TIMEOUT


# --- well-behaved clients keep working ---------------------------------------------------------


def test_pipelined_requests_and_large_bodies_are_served(live_gw: Live, limited: live.LiveProcess) -> None:
    with connect(limited) as sock:
        sock.sendall(request() + request() + request(headers=b"Connection: close\r\n"))
        answer = read_answer(sock)
    assert answer.count(b"HTTP/1.1 200 OK") == 3
    big = json.dumps({"model": MODEL, "input": "x" * (4 << 20)}).encode()  # many socket reads after the head
    with connect(limited) as sock:
        sock.sendall(
            request(
                "/v1/responses",
                b"Authorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n" % (live_gw.owner.key.encode(), len(big)),
                b"POST",
            )
            + big
        )
        answer = read_answer(sock)
    assert status_of(answer) == 200, answer[:500]


# --- connections -------------------------------------------------------------------------------


def test_connections_beyond_the_limit_get_503(live_gw: Live, start_gateway: Callable[..., live.LiveProcess]) -> None:
    gateway = start_gateway(GATEWAY_MAX_CONNECTIONS="4", GATEWAY_HEADER_TIMEOUT="60")
    idle = [connect(gateway) for _ in range(3)]
    try:
        # The wait_http probe's connection may linger briefly: retry until only ours remain.
        live.poll(lambda: healthy(gateway), timeout=SLACK, what="the 4th connection served")
        extra = connect(gateway)
        idle.append(extra)
        with connect(gateway) as sock:
            sock.sendall(request(headers=b"Connection: close\r\n"))
            assert status_of(read_answer(sock)) == 503
    finally:
        for sock in idle:
            sock.close()
    live.poll(lambda: healthy(gateway), timeout=SLACK, what="served again once connections closed")


def test_many_silent_connections_are_shed(limited: live.LiveProcess) -> None:
    sockets = [connect(limited) for _ in range(200)]
    try:
        assert all(read_answer(sock) == b"" for sock in sockets)  # each closed by the head timeout
    finally:
        for sock in sockets:
            sock.close()
    assert healthy(limited)


# --- the response's head held for its first body write (gateway/conf/server.py HeldHead) ---------


def test_expect_100_continue_is_answered_before_the_body(live_gw: Live, limited: live.LiveProcess) -> None:
    """The interim ``100 Continue`` goes out at once (it is not held like a response's head):
    a client that waits for it before sending its body is answered."""
    body = json.dumps({"model": MODEL, "input": "hello"}).encode()
    with connect(limited) as sock:
        sock.sendall(
            request(
                "/v1/responses",
                b"Authorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Expect: 100-continue\r\nConnection: close\r\n" % (live_gw.owner.key.encode(), len(body)),
                b"POST",
            )
        )
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        sock.sendall(body)
        answer = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n") :] + read_answer(sock)
    assert status_of(answer) == 200, answer[:500]
    _head, _, payload = answer.partition(b"\r\n\r\n")
    assert json.loads(payload)["object"] == "response"


def test_heads_and_bodies_of_kept_alive_answers_stay_in_order(live_gw: Live, limited: live.LiveProcess) -> None:
    """Several answers on one connection (JSON, an error, a stream): each head is followed by
    its own body, whole, before the next answer starts."""
    ok = json.dumps({"model": MODEL, "input": "hello"}).encode()
    stream = json.dumps({"model": MODEL, "input": "hello", "stream": True}).encode()
    auth = b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n" % live_gw.owner.key.encode()
    with connect(limited) as sock:
        for payload, status in ((ok, 200), (b"{", 400), (stream, 200), (ok, 200)):
            sock.sendall(request("/v1/responses", auth + b"Content-Length: %d\r\n" % len(payload), b"POST") + payload)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            head, _, rest = answer.partition(b"\r\n\r\n")
            assert status_of(head) == status, head
            if b"transfer-encoding: chunked" in head.lower():
                while not rest.endswith(b"0\r\n\r\n"):
                    rest += sock.recv(65536)
                assert b"response.completed" in rest
            else:
                length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
                while len(rest) < length:
                    rest += sock.recv(65536)
                assert len(rest) == length, (head, rest[:200])
                json.loads(rest)


def test_a_head_request_is_answered_at_once_on_a_kept_alive_connection(limited: live.LiveProcess) -> None:
    """``HEAD`` answers have no body write (uvicorn skips it), so their head is not held: the
    client gets it at once, and the connection serves the next request."""
    with connect(limited) as sock:
        sock.settimeout(5)
        sock.sendall(request(method=b"HEAD"))
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert status_of(head) == 200, head
        assert rest == b""
        sock.sendall(request(headers=b"Connection: close\r\n"))
        assert status_of(read_answer(sock)) == 200
