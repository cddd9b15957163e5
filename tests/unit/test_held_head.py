"""The response head held until the first body write (gateway/conf/server.py ``HeldHead``)."""

from __future__ import annotations

import asyncio

from gateway.conf.server import HeldHead


class RecordingTransport(asyncio.Transport):
    """Records each write call as it would reach the socket (one entry per system call)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.calls.append(bytes(data))

    def writelines(self, list_of_data: object) -> None:
        self.calls.append(b"".join(list_of_data))  # type: ignore[arg-type]

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


def test_the_head_goes_out_with_the_first_body_write() -> None:
    real = RecordingTransport()
    held = HeldHead(real)
    held.write(HEAD)
    assert real.calls == []
    held.write(b"{}")
    assert real.calls == [HEAD + b"{}"]
    held.write(b"more")  # later writes pass straight through
    assert real.calls == [HEAD + b"{}", b"more"]


def test_an_interim_100_continue_is_not_held() -> None:
    real = RecordingTransport()
    held = HeldHead(real)
    held.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert real.calls == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    held.write(HEAD)
    held.write(b"{}")
    assert real.calls == [b"HTTP/1.1 100 Continue\r\n\r\n", HEAD + b"{}"]


def test_only_the_first_head_is_held_and_a_close_sends_it_first() -> None:
    real = RecordingTransport()
    held = HeldHead(real)
    held.write(HEAD)
    held.close()  # an application that ended without a body: the head still goes out
    assert real.calls == [HEAD]
    assert real.closed
    assert held.is_closing()
    again = HeldHead(RecordingTransport())
    again.write(HEAD)
    again.write(b"{}")
    again.write(b"HTTP/1.1 200 OK\r\n")  # body bytes that look like a status line are not held
    assert again.transport.calls[-1] == b"HTTP/1.1 200 OK\r\n"  # type: ignore[attr-defined]


def test_a_close_with_nothing_held_just_closes() -> None:
    real = RecordingTransport()
    held = HeldHead(real)
    held.write(HEAD)
    held.write(b"{}")
    held.close()
    assert real.calls == [HEAD + b"{}"]
    assert real.closed
