"""Live processes for integration tests: real servers on real loopback sockets.

Also the small wire helpers the live tests share: the error-envelope check, a strict SSE
parser, polling with a deadline, and :class:`SseProbe`, an upstream that records when the
gateway hangs up on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


# Each suite picks its servers' ports in a range of its own, below the kernel's ephemeral range
# (32768 and up, where outgoing connections and ``bind(0)`` take theirs): .ci/run runs the embedded
# and the PostgreSQL suites side by side, and a port found free by one could be taken by the other
# before its server binds it; the server then fails to start while the other answers its URL.
PORT_RANGES = {"embedded": (20000, 26300), "postgres": (26300, 32700)}


def free_port() -> int:
    """A port free now on 127.0.0.1, in this suite's range (see ``PORT_RANGES``)."""
    low, high = PORT_RANGES["postgres" if os.environ.get("DATABASE_URL") else "embedded"]
    for _ in range(500):
        port = random.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before serving {url}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


class LiveProcess:
    def __init__(self, args: list[str], env: dict[str, str], ready_url: str, log: Path) -> None:
        self.args = args
        self.env = env
        self.ready_url = ready_url
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""  # base URL, for servers
        # What was still running in the process's group once it had ended (killed by reap()).
        self.survivors: list[tuple[int, str]] = []

    def start(self) -> LiveProcess:
        handle = open(self.log, "ab")  # noqa: SIM115 - lives as long as the process
        # A process group of its own: whatever it starts (uvicorn workers, the usage writer,
        # Celery) can be found, and killed, once it has ended (reap()).
        self.proc = subprocess.Popen(
            self.args, cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_http(self.ready_url, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the process and wait for it (killed after ``timeout``). Its children are left
        alone (tests check that they end on their own): :meth:`reap` them after."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def reap(self) -> list[tuple[int, str]]:
        """Once the test is done with it: kill whatever of the process's group still runs and
        say what it was (also kept in :attr:`survivors`). A child that outlived its parent (a
        uvicorn worker whose shutdown hung) would otherwise serve on into later tests as one
        more replica on their database and Redis, probing their accounts."""
        if self.proc is None:
            return []
        self.stop()
        self.survivors = kill_group(self.proc.pid)
        for pid, command in self.survivors:
            warnings.warn(f"{self.args[1:4]}: process {pid} ({command[:120]}) outlived it; killed", stacklevel=2)
        return self.survivors


@contextlib.contextmanager
def running(process: LiveProcess) -> Iterator[LiveProcess]:
    process.start()
    try:
        yield process
    finally:
        process.reap()


def fake_upstream(port: int, env: dict[str, str], log: Path, *extra: str) -> LiveProcess:
    args = [sys.executable, "-m", "gateway.devtools.fake_upstream", "--port", str(port), *extra]
    return LiveProcess(args, env, f"http://127.0.0.1:{port}/health", log)


def gateway(port: int, env: dict[str, str], log: Path, server: str = "uvicorn", *extra: str) -> LiveProcess:
    args = [sys.executable, "manage.py", "serve", "--port", str(port), "--server", server, *extra]
    process = LiveProcess(args, env, f"http://127.0.0.1:{port}/healthz", log)
    process.url = f"http://127.0.0.1:{port}"
    return process


def child_env(**overrides: str) -> dict[str, str]:
    """The test environment for a live process, which runs the production settings module.

    Not tests.settings: it makes a new GATEWAY_DATA_DIR on import, so a child would not share
    the data directory (config change token, usage spool) with the tests.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["DJANGO_SETTINGS_MODULE"] = "gateway.conf.settings"
    env.update(overrides)
    return env


# --- processes through /proc ------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rpartition(")")[2].split()


def group(pgid: int) -> list[tuple[int, str]]:
    """The live processes of group ``pgid``: each one's pid and command line."""
    return [(pid, " ".join(cmdline(pid))) for pid in _pids_where(2, pgid, running_only=True)]


def kill_group(pgid: int, grace: float = 5.0) -> list[tuple[int, str]]:
    """Give group ``pgid`` ``grace`` seconds to end on its own (an orphaned usage writer's last
    pass), then SIGKILL what is left; returns what was left."""
    deadline = time.monotonic() + grace
    while (left := group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    return left


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [part.decode() for part in raw.split(b"\0") if part]


def _pids_where(field: int, value: int, *, running_only: bool = False) -> list[int]:
    """The pids whose /proc/<pid>/stat ``field`` (see :func:`_stat`) is ``value``
    (``running_only``: zombies left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is None or int(fields[field]) != value:
                continue
            if not (running_only and fields[0] in ("Z", "X")):
                found.append(int(entry.name))
    return sorted(found)


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid``."""
    return _pids_where(1, pid)


@dataclasses.dataclass(frozen=True)
class Child:
    """A process, told apart from a later one with the same pid by its start time."""

    pid: int
    started: str

    @classmethod
    def of(cls, pid: int) -> Child:
        fields = _stat(pid)
        assert fields is not None, f"process {pid} is gone"
        return cls(pid, fields[19])

    def running(self) -> bool:
        fields = _stat(self.pid)
        return fields is not None and fields[19] == self.started and fields[0] not in ("Z", "X")

    def signal(self, signum: int) -> None:
        if self.running():
            os.kill(self.pid, signum)


# --- a small file system -------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` (skips the test when mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        # Lazy: a process the test failed to stop may still hold a file there.
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the file system has no byte left."""
    chunk = b"\0" * 4096
    with open(path, "wb", buffering=0) as handle:
        while True:
            try:
                handle.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return


# --- a dependency that can be cut off ----------------------------------------------------------


class TcpRelay:
    """A TCP relay on a fixed loopback port in front of a dependency (a database, Redis).

    :meth:`cut` closes every relayed connection and the listening socket, so new connections
    are refused, as when the dependency is down; :meth:`restore` listens on the same port again.
    :meth:`silence` makes it a dependency that accepts and never answers (what is sent to it is
    swallowed, new connections are accepted and left alone) until :meth:`cut`.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.silent = False

    def silence(self) -> None:
        self.silent = True

    def restore(self) -> TcpRelay:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut(self) -> None:
        self.silent = False
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            if self.silent:
                with self._lock:
                    self._sockets.append(client)  # held open, never read
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not self.silent:
                    sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


# --- wire helpers ---------------------------------------------------------------------------

T = TypeVar("T")


def poll(check: Callable[[], T], timeout: float = 30.0, interval: float = 0.02, what: str = "condition") -> T:
    """Call ``check`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {value!r})")
        time.sleep(interval)


async def poll_async(check: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    """:func:`poll` inside an event loop: yields to it between checks."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.005)


def assert_error(
    response: httpx.Response,
    status: int,
    code: str | None,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    """Check an OpenAI error answer: status, JSON envelope with exactly its four keys, x-request-id."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get("x-request-id", "").startswith("req_"), response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert (error["type"], error["code"], error["param"]) == (type, code, param), error
    assert isinstance(error["message"], str)
    assert error["message"]
    if message is not None:
        assert error["message"] == message
    return dict(error)


def sse_frames(raw: bytes) -> list[bytes]:
    """Split an SSE body into frames (without their blank-line terminator); it must end on a frame boundary."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    return raw[:-2].split(b"\n\n")


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """The events of an SSE body, checking each frame is exactly ``event: T`` + ``data: JSON`` with type T.

    Comment frames (keep-alives) are skipped.
    """
    events = []
    for frame in sse_frames(raw):
        if frame.startswith(b":"):
            assert frame == b": keep-alive", frame
            continue
        event_line, data_line = frame.split(b"\n")
        assert event_line.startswith(b"event: "), frame
        assert data_line.startswith(b"data: "), frame
        data = json.loads(data_line[6:])
        assert data["type"] == event_line[7:].decode(), frame
        events.append(data)
    return events


# --- an upstream that records hang-ups -------------------------------------------------------


class SseProbe:
    """A minimal upstream in a thread: answers every POST with a slow, endless-looking SSE stream
    (``frames`` events ``interval`` seconds apart) and records how each connection ended.

    ``closed`` holds one dict per finished connection: ``sent`` frames before it ended, ``finished``
    (True when it sent everything), ``at`` (monotonic time of the end).
    """

    def __init__(self, frames: int = 200, interval: float = 0.05) -> None:
        self.frames = frames
        self.interval = interval
        self.opened = 0
        self.closed: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent, finished = 0, False
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            with self._lock:
                self.opened += 1
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            created: dict[str, Any] = {
                "id": "resp_probe",
                "object": "response",
                "status": "in_progress",
                "output": [],
                "usage": None,
            }
            for seq in range(self.frames):
                # created, then real output (the gateway holds the prelude back until some
                # arrives), then an endless-looking tail.
                kind = ("response.created", "response.output_item.added")[seq] if seq < 2 else "response.in_progress"
                event = {"type": kind, "sequence_number": seq, "response": created}
                frame = b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps(event).encode())
                writer.write(b"%x\r\n%s\r\n" % (len(frame), frame))
                await writer.drain()
                sent += 1
                # A hang-up shows as EOF on the read side long before a write fails.
                with contextlib.suppress(asyncio.TimeoutError):
                    if await asyncio.wait_for(reader.read(1), self.interval) == b"":
                        break
            else:
                finished = True
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with self._lock:
                self.closed.append({"sent": sent, "finished": finished, "at": time.monotonic()})
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class SilentProbe:
    """An upstream that reads each request and never answers; ``closed`` holds the monotonic
    times at which the gateway hung up on it (one per connection)."""

    def __init__(self) -> None:
        self.opened: list[float] = []
        self.closed: list[float] = []
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.base_url = f"http://127.0.0.1:{self._server.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            received = b""
            while b"\r\n\r\n" not in received and (data := conn.recv(65536)):
                received += data
            self.opened.append(time.monotonic())
            with contextlib.suppress(OSError):
                while conn.recv(65536):  # the body, then nothing until the gateway hangs up
                    pass
            self.closed.append(time.monotonic())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()


# --- the fake upstream with server-wide fault knobs ------------------------------------------


# What tells a gateway's account probe (accounts.health.probing.probe_body) from a request.
PROBE_MARK = b'"input":"ping","max_output_tokens":16'


class KnobbedFake:
    """The fake upstream (gateway.devtools.fake_upstream.server) served from a thread of the test process, with
    server-wide fault knobs, so that ONE account can fail while another, on a second upstream,
    serves (per-request ``metadata`` knobs would reach whichever account gets the request).

    ``set(status="503")``: every request is answered as if it carried ``x-fake-status: 503``
    (any knob of the fake; headers win over metadata); ``set()`` clears them. ``configure(**opts)``
    changes the fake's :class:`~gateway.devtools.fake_upstream.server.Config` (e.g. ``require_key``). ``script``,
    when set, is called with each request (its ``headers``, ``body``...) and its steps (raw bytes)
    are the answer. ``requests()`` is
    what ``GET /_fake/requests`` shows.
    """

    def __init__(self, **config: Any) -> None:
        from gateway.devtools.fake_upstream import server as fake

        self._fake = fake
        self.state = fake.State(fake.make_config(**config))
        self.knobs: tuple[tuple[bytes, bytes], ...] = ()
        self.script: Callable[[Any], list[Any]] | None = None  # bytes, or a float: a pause (s)
        self.received = 0  # POSTs to /responses so far, the gateway's probes left out
        self.probes = 0  # the gateway's account probes (accounts/health/probing.py)
        owner = self

        class Connection(fake.Connection):
            def respond(self, req: Any) -> None:
                is_post = req.method == b"POST" and req.url.partition(b"?")[0].endswith(b"/responses")
                is_probe = is_post and PROBE_MARK in req.body
                owner.received += is_post and not is_probe
                owner.probes += is_probe
                if owner.script is not None and is_post:
                    self.state.history.append((time.time(), req.method, req.url, req.headers, req.body))
                    self.play(owner.script(req), req.keep_alive)
                    return
                req.headers = [*req.headers, *owner.knobs]
                super().respond(req)

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(Connection), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    async def _listen(self, connection: Callable[[Any], asyncio.Protocol]) -> asyncio.Server:
        return await self._loop.create_server(lambda: connection(self.state), "127.0.0.1", 0)

    def set(self, **knobs: str) -> None:
        self.knobs = tuple(
            (b"x-fake-" + name.replace("_", "-").encode(), value.encode()) for name, value in knobs.items()
        )

    def configure(self, **options: Any) -> None:
        config = self._fake.make_config(self.state.config, **options)
        self._loop.call_soon_threadsafe(self.state.set_config, config)
        poll(lambda: self.state.config == config, timeout=5, what="fake config applied")

    def requests(self) -> list[dict[str, Any]]:
        return [self._fake.describe(entry) for entry in list(self.state.history)]

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
