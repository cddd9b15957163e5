"""The gateway's benchmark: ``make bench`` (``python -m bench.run``). Method and budget: docs/performance.md.

Everything runs on loopback in one throw-away data directory: the fake upstream
(``gateway.devtools.fake_upstream.server``), the gateway started as the README serves it (``manage.py serve`` with its
defaults: uvicorn), the same gateway under Daphne, the same gateway in Redis mode when a Redis answers,
and a LiteLLM proxy (from its own venv, ``bench/.venv-litellm``) forwarding to the same fake upstream.
``wrk`` generates the load (C, not Python-bound); first-byte times come from a raw-socket client at one
request at a time. Each scenario runs its targets interleaved, several rounds, and reports medians.

Environment:
    BENCH_QUICK=1         ~2-minute smoke run (fewer/shorter rounds, 20k requests for memory)
    BENCH_GATEWAY_ENV     extra ``K=V`` pairs for every gateway process, e.g. "GATEWAY_UPSTREAM_TRANSPORT=fast"
    BENCH_VARIANTS        more gateway columns, "NAME:K=V ...;NAME2:K=V ...", e.g.
                          "httpx:GATEWAY_UPSTREAM_TRANSPORT=httpx;fast:GATEWAY_UPSTREAM_TRANSPORT=fast";
                          "NAME@PATH:..." serves that column from another checkout (A/B of two commits)
    BENCH_LITELLM=0       skip LiteLLM (otherwise installed on first use into bench/.venv-litellm)
    BENCH_LITELLM_SPEC    what pip installs there (default ``litellm[proxy]``)
    BENCH_DAPHNE=0        skip the Daphne variant
    BENCH_REDIS_URL       Redis for the Redis-mode variant; default redis://127.0.0.1:6379/14 if it answers; 0: off
    BENCH_STRICT=1        exit 1 when a budget line fails
    BENCH_KEEP=1          keep the data directory (process logs) instead of deleting it
    BENCH_ROUNDS          rounds of every wrk scenario but latency @1 (default 3; quick 1)
    BENCH_MEMORY_REQUESTS requests of the memory scenario (default 100,000; quick 20,000; it stops after
                          240 s, quick 60 s, whatever the count, and says so)
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import math
import operator
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LUA = BENCH / "wrk_bench.lua"
RESULTS = BENCH / "results"
LITELLM_VENV = BENCH / ".venv-litellm"
# Two fake upstreams, one per answer length, each routed by model (see ``body``).
MODEL = "gpt-4.1"  # 20 output tokens
MODEL_LONG = "gpt-4.1-mini"  # 200 output tokens
MASTER_KEY = "sk-bench-master"
PROMPT = "Say hello to the benchmark."
MIX_KEYS = 10_000
MIX_TENANTS = 1_000
STREAM_SMALL = 20  # tokens: the fake upstream sends tokens + 8 events, so 28 events
STREAM_LARGE = 200  # 208 events
MODEL_TOKENS = {MODEL: STREAM_SMALL, MODEL_LONG: STREAM_LARGE}
# "Must not grow without bound": RSS growth over the second half of the memory run. One-time steps
# (a new worker thread with its own SQLite connection and page cache, allocator arenas) were measured
# at up to ~15 MiB and then stay flat; a leak of 1 KiB per request would add ~50 MiB over 50k requests.
MEMORY_GROWTH_LIMIT_MIB = 16.0
# Keys of Bench.raw holding wrk runs (lists of WrkResult dicts per target).
WRK_SCENARIOS = (
    "keymix_first_use_c16",
    "latency_c1",
    "throughput_c16",
    "throughput_c64",
    f"stream{STREAM_SMALL}_c16",
    f"stream{STREAM_LARGE}_c16",
    "keymix_c16",
    "ws_stream_c16",
    "sse_client_stream_c16",
)

# Variables of the caller's environment that would change what the gateway under test is: the
# harness decides the database (a fresh SQLite), Redis, server, host and port itself.
_GATEWAY_ENV_DROP = ("DATABASE_URL", "REDIS_URL", "GATEWAY_SERVER", "HOST", "PORT", "DJANGO_SETTINGS_MODULE")


@dataclass(frozen=True)
class Plan:
    """How long and how often each scenario runs."""

    quick: bool
    latency_rounds: int  # rounds of the 1-concurrent latency scenario
    rounds: int  # rounds of every other wrk scenario
    seconds: int  # length of one wrk run (wrk takes whole seconds)
    ttfb_samples: int  # first-byte samples per target
    memory_requests: int
    memory_max_seconds: int  # the memory run stops there even short of memory_requests (a loaded machine)
    idle_pause: float  # seconds of idleness before the last RSS reading


# Fields in Plan's order: quick, latency_rounds, rounds, seconds, ttfb_samples, memory_requests,
# memory_max_seconds, idle_pause.
FULL = Plan(False, 5, 3, 3, 300, 100_000, 240, 5)
QUICK = Plan(True, 2, 1, 1, 60, 20_000, 60, 2)

_T0 = time.monotonic()


def log(message: str) -> None:
    # Progress goes to stderr so stdout carries only the table.
    sys.stderr.write(f"[{time.monotonic() - _T0:6.1f}s] {message}\n")
    sys.stderr.flush()


class BenchError(Exception):
    """A set-up step failed; the message says which and why."""


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return 200 <= int(reply.status) < 300
    except (urllib.error.URLError, OSError):
        return False


class Service:
    """A process this harness started (in its own session, so stopping it stops its children too)."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        env: dict[str, str],
        ready_url: str,
        log_path: Path,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.env = env
        self.ready_url = ready_url
        self.log_path = log_path
        self.ready = ready or (lambda: http_ok(ready_url))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def launch(self, cwd: Path = ROOT) -> Service:
        with open(self.log_path, "ab") as handle:
            self.proc = subprocess.Popen(
                self.args, cwd=cwd, env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> Service:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode} at start; log:\n{self.tail()}")
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise BenchError(f"{self.name} did not answer {self.ready_url} within {timeout:.0f}s; log:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the group of the session started above: ours only
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident set size (VmRSS) of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def descendants(pid: int) -> list[int]:
    """The children of a process, their children, and so on (a gateway's usage writer)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                children = [int(c) for c in (task / "children").read_text().split()]
                found += children
                todo += children
    return found


def tree_rss_mib(pid: int) -> tuple[float, float]:
    """RSS of a process and the sum over its descendants, in MiB."""
    rest = 0.0
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            rest += rss_mib(child)
    return rss_mib(pid), rest


def wait_quiet(pids: Sequence[int], max_wait: float = 5.0) -> None:
    """Wait until the processes use <10% CPU over 0.2 s.

    After a load run the gateway's usage writer process still writes the records of the run;
    letting that finish keeps it out of the next target's measurement.
    """
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        before = [cpu_seconds(pid) for pid in pids]
        time.sleep(0.2)
        if all(cpu_seconds(pid) - cpu < 0.02 for pid, cpu in zip(pids, before, strict=True)):
            return


# ---------------------------------------------------------------------------------------------------
# Tools: wrk and LiteLLM
# ---------------------------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """The ``wrk --version`` line; installs Debian's wrk when missing and running as root."""
    if shutil.which("wrk") is None:
        if os.geteuid() != 0:
            raise BenchError("wrk is not installed: install it (Debian/Ubuntu: sudo apt-get install -y wrk) and rerun.")
        log("wrk is not installed: running `apt-get install -y wrk`")
        done = subprocess.run(["apt-get", "install", "-y", "wrk"], check=False)
        if done.returncode != 0:
            log("apt-get install failed: running `apt-get update` then `apt-get install -y wrk`")
            subprocess.run(["apt-get", "update"], check=False)
            subprocess.run(["apt-get", "install", "-y", "wrk"], check=False)
        if shutil.which("wrk") is None:
            raise BenchError("could not install wrk with apt-get; install it by hand and rerun.")
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).strip().splitlines()[0]


def ensure_litellm() -> tuple[Path | None, str]:
    """The ``litellm`` executable of bench/.venv-litellm (installed on first use) and its version.

    A separate venv keeps LiteLLM's many pinned dependencies out of the project's environment. Any
    failure is reported and the run goes on without LiteLLM.
    """
    if os.environ.get("BENCH_LITELLM", "1") == "0":
        return None, "skipped (BENCH_LITELLM=0)"
    exe = LITELLM_VENV / "bin" / "litellm"
    python = LITELLM_VENV / "bin" / "python"
    if not exe.exists():
        spec = os.environ.get("BENCH_LITELLM_SPEC", "litellm[proxy]")
        install_log = BENCH / ".venv-litellm-install.log"
        log(
            f"installing {spec!r} into {LITELLM_VENV.relative_to(ROOT)} "
            "(one-time, a few minutes; BENCH_LITELLM=0 skips)"
        )
        try:
            with open(install_log, "wb") as handle:
                subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True, stdout=handle)
                subprocess.run(
                    [str(python), "-m", "pip", "install", "--disable-pip-version-check", spec],
                    check=True,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    timeout=1800,
                )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            tail = install_log.read_text(errors="replace").splitlines()[-5:] if install_log.exists() else []
            log(f"LiteLLM install failed ({exc}); continuing without it. Last lines of {install_log}:")
            for line in tail:
                log("    " + line)
            return None, f"install failed: {exc}"
    if not exe.exists():
        return None, "install incomplete (no litellm executable)"
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        return None, "litellm is not importable in bench/.venv-litellm: " + out.stderr.strip()[-200:]
    return exe, out.stdout.strip()


# ---------------------------------------------------------------------------------------------------
# Load and measurement
# ---------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """Something answering ``POST /v1/responses`` on loopback."""

    key: str  # direct | gateway | daphne | redis | litellm
    port: int
    auth: str
    service: Service | None = None  # None: the fake upstream itself
    min_seconds: int = 1  # shortest wrk run that completes enough of its requests
    events: dict[int, int] = field(default_factory=dict)  # tokens asked -> SSE events counted per response

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/responses"

    @property
    def pids(self) -> list[int]:
        """The target's processes: the server and its children (a gateway's usage writer)."""
        if self.service is None:
            return []
        return [self.service.pid, *descendants(self.service.pid)]


@dataclass
class WrkResult:
    """One wrk run. Only good answers are throughput; every error fails the scenario's budget line."""

    requests: int  # answers received, whatever their status
    seconds: float
    status_errors: int  # answers with a status >= 400 (wrk's count; /v1/responses never answers 1xx or 3xx)
    socket_errors: int  # connect, read and write errors and timeouts: requests that got no answer
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.status_errors + self.socket_errors

    @property
    def rps(self) -> float:
        return good_rps(asdict(self))


def good_rps(run: dict[str, Any]) -> float:
    """Good answers (status < 400) per second of a run, as stored in ``Bench.raw``."""
    return (run["requests"] - run["status_errors"]) / run["seconds"] if run["seconds"] else 0.0


def run_errors(run: dict[str, Any]) -> int:
    return int(run["status_errors"] + run["socket_errors"])


def parse_wrk(stdout: str) -> WrkResult:
    """The ``BENCH {json}`` line that bench/wrk_bench.lua prints from wrk's ``done()`` hook."""
    summary = next((line[6:] for line in stdout.splitlines() if line.startswith("BENCH ")), None)
    if summary is None:
        raise BenchError(f"no BENCH line in wrk's output: {stdout[-500:]}")
    data = json.loads(summary)
    return WrkResult(
        requests=int(data["requests"]),
        seconds=data["duration_us"] / 1e6,
        status_errors=int(data["status_errors"]),
        socket_errors=sum(int(data[name]) for name in ("connect_errors", "read_errors", "write_errors", "timeouts")),
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        mean_ms=data["mean_us"] / 1000,
    )


def body(stream: bool = False, tokens: int = STREAM_SMALL) -> str:
    """A request body; the answer length comes from the model, which picks the fake upstream.

    Not from the fake's per-request knob (``metadata.fake_tokens``): requests carrying knobs skip the
    fake's answer cache, which made the fake itself the bottleneck at ~1,000 streams/s.
    """
    model = MODEL_LONG if tokens == STREAM_LARGE else MODEL
    payload: dict[str, Any] = {"model": model, "input": PROMPT}
    if stream:
        payload["stream"] = True
    return json.dumps(payload, separators=(",", ":"))


def run_wrk(
    target: Target,
    connections: int,
    seconds: int,
    request_body: str,
    keys_file: Path | None = None,
    *,
    exact: bool = False,
    keys_from: int | None = None,
) -> WrkResult:
    """One wrk run; ``seconds`` is raised to the target's ``min_seconds`` unless ``exact``.
    ``keys_file``: each request picks a key by the Zipf law, or, with ``keys_from``, takes the
    file's keys in turn from that line on."""
    threads = 1 if connections == 1 else 2
    seconds = seconds if exact else max(seconds, target.min_seconds)
    env = dict(os.environ, WRK_BODY=request_body, WRK_THREADS=str(threads))
    if keys_file is not None:
        env["WRK_KEYS_FILE"] = str(keys_file)
        if keys_from is not None:
            env.update(WRK_KEYS_ORDER="turn", WRK_KEYS_FROM=str(keys_from))
    else:
        env["WRK_AUTH"] = target.auth
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s", str(LUA), target.url]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=seconds + 90, check=False)
    if done.returncode != 0:
        raise BenchError(f"wrk failed against {target.key}: {done.stdout[-500:]} {done.stderr[-500:]}")
    result = parse_wrk(done.stdout)
    if result.errors:
        log(
            f"  ERRORS: {target.key}: {result.status_errors} answers >= 400 and {result.socket_errors} socket errors "
            f"in {result.requests} answers"
        )
    return result


def run_socket_load(mode: str, target: Target, connections: int, seconds: int, payload: str) -> WrkResult:
    """One run of bench/socket_load.py (``mode`` "ws" or "sse") against ``target``, as a WrkResult."""
    command = [
        sys.executable,
        "-m",
        "bench.socket_load",
        f"--mode={mode}",
        f"--port={target.port}",
        f"--auth={target.auth}",
        f"--body={payload}",
        f"--connections={connections}",
        f"--seconds={seconds}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode:
        raise BenchError(f"socket_load {mode} against {target.key} failed: {done.stderr[-500:]}")
    return parse_wrk(done.stdout)


def rotated(targets: Sequence[Target], shift: int) -> list[Target]:
    shift %= len(targets)
    return [*targets[shift:], *targets[:shift]]


def interleave(
    name: str, targets: Sequence[Target], rounds: int, measure: Callable[[Target], WrkResult], show: str = "rps"
) -> dict[str, list[WrkResult]]:
    """Run ``measure`` for every target, round after round, rotating the order each round.

    Interleaving spreads slow drifts of a shared machine (other processes, thermal, page cache) over
    all targets instead of charging them to whichever ran last.
    """
    results: dict[str, list[WrkResult]] = {t.key: [] for t in targets}
    for r in range(rounds):
        for target in rotated(targets, r):
            result = measure(target)
            results[target.key].append(result)
            wait_quiet(target.pids)
        shown = " | ".join(
            f"{key} {getattr(runs[-1], show):,.{0 if show == 'rps' else 2}f}" for key, runs in results.items()
        )
        log(f"{name} round {r + 1}/{rounds}: {shown}")
    return results


class RawHttp:
    """A minimal keep-alive HTTP/1.1 client on a blocking socket, for first-byte timing.

    At one request at a time the client's own cost is a constant added to gateway and direct alike;
    a raw socket keeps that constant small and shows exactly when the first body byte arrived.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buf = None, b""

    def _recv(self) -> bytes:
        assert self.sock is not None
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("connection closed by the server")
        return data

    def post(self, auth: str, payload: bytes) -> tuple[float, float, int, bytes]:
        """(seconds to the first body byte, seconds to the end, status, body); retries a stale connection once."""
        for attempt in (0, 1):
            try:
                return self._post(auth, payload)
            except (ConnectionError, OSError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _post(self, auth: str, payload: bytes) -> tuple[float, float, int, bytes]:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = (
            f"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nAuthorization: Bearer {auth}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        start = time.perf_counter()
        self.sock.sendall(request)
        buf = self.buf
        while b"\r\n\r\n" not in buf:
            buf += self._recv()
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        length = int(headers[b"content-length"]) if b"content-length" in headers else None
        if length != 0:
            while not buf:
                buf += self._recv()
        first = time.perf_counter()
        out = bytearray()
        if headers.get(b"transfer-encoding") == b"chunked":
            while True:
                while b"\r\n" not in buf:
                    buf += self._recv()
                size_line, _, buf = buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while not buf.startswith(b"\r\n") and b"\r\n\r\n" not in buf:  # trailers, if any
                        buf += self._recv()
                    buf = buf[2:] if buf.startswith(b"\r\n") else buf.partition(b"\r\n\r\n")[2]
                    break
                while len(buf) < size + 2:
                    buf += self._recv()
                out += buf[:size]
                buf = buf[size + 2 :]
        elif length is not None:
            while len(buf) < length:
                buf += self._recv()
            out += buf[:length]
            buf = buf[length:]
        else:  # delimited by the end of the connection
            out += buf
            with contextlib.suppress(ConnectionError):
                while True:
                    out += self._recv()
            buf = b""
            headers[b"connection"] = b"close"
        end = time.perf_counter()
        self.buf = buf
        if headers.get(b"connection") == b"close":
            self.close()
        return first - start, end - start, status, bytes(out)


def count_events(payload: bytes) -> int:
    """SSE events in a relayed stream (``data:`` lines; an OpenAI-style ``[DONE]`` does not count)."""
    return sum(1 for line in payload.split(b"\n") if line.startswith(b"data:") and line.strip() != b"data: [DONE]")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, mean and nearest-rank percentiles of ``values`` (for the JSON, instead of every sample)."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}

    def rank(pct: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))], 4)

    stats = {"n": len(ordered), "mean": round(statistics.fmean(ordered), 4)}
    stats.update(p50=rank(50), p90=rank(90), p99=rank(99), max=round(ordered[-1], 4))
    return stats


# ---------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------


def manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"manage.py {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def env_pairs(text: str, source: str) -> dict[str, str]:
    """``"K=V K2=V2"`` (shell quoting allowed) as a dict."""
    pairs: dict[str, str] = {}
    for item in shlex.split(text):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise BenchError(f"{source}: {item!r} is not NAME=VALUE")
        pairs[name] = value
    return pairs


SCENARIOS = ("latency", "throughput", "streaming", "ttfb", "keymix", "websocket", "memory", "scale")


def selected_scenarios() -> set[str] | None:
    """``BENCH_ONLY=latency,keymix``: run these scenarios only (for experiments; the table shows what ran)."""
    text = os.environ.get("BENCH_ONLY", "").strip()
    if not text:
        return None
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - set(SCENARIOS)
    if unknown:
        raise BenchError(f"BENCH_ONLY: unknown scenario(s) {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    return names


@dataclass
class Variant:
    """One BENCH_VARIANTS column: extra environment, and the checkout it is served from (None: this one)."""

    env: dict[str, str]
    checkout: str | None = None


def extra_variants() -> dict[str, Variant]:
    """``BENCH_VARIANTS="fast:GATEWAY_UPSTREAM_TRANSPORT=fast;httpx:GATEWAY_UPSTREAM_TRANSPORT=httpx"``:
    more gateways (uvicorn, embedded mode) measured interleaved with the others, one column each.
    ``NAME@PATH:...`` serves the column from the checkout at PATH (a ``git worktree`` of another
    commit, sharing this run's database, so its migrations must match): an A/B of two commits in
    one run, interleaved, instead of two runs on a machine whose load moved in between."""
    variants: dict[str, Variant] = {}
    for spec in filter(None, (part.strip() for part in os.environ.get("BENCH_VARIANTS", "").split(";"))):
        head, sep, pairs = spec.partition(":")
        name, at, checkout = (part.strip() for part in head.partition("@"))
        if not sep or not name.isidentifier() or name in ("direct", "gateway", "daphne", "redis", "watched", "litellm"):
            raise BenchError(f"BENCH_VARIANTS: {spec!r} is not NAME[@PATH]:K=V ... with a new NAME")
        if at and not (Path(checkout) / "manage.py").is_file():
            raise BenchError(f"BENCH_VARIANTS: {spec!r}: {checkout!r} is not a checkout of the gateway")
        variants[name] = Variant(env_pairs(pairs, f"BENCH_VARIANTS {name}"), checkout if at else None)
    return variants


def redis_pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


_redis_clients: dict[str, Any] = {}


def redis_stats(url: str) -> tuple[int, int]:
    """Server-wide ``(total_commands_processed, total_reads_processed)`` of a Redis.

    Reads are socket reads of client data: a request, or a pipeline sent at once, is one read, so the
    delta counts round trips where the command count would count each pipelined command. One client
    connection is kept, so each call adds exactly one command and one read of its own.
    """
    import redis

    client = _redis_clients.get(url)
    if client is None:
        client = _redis_clients[url] = redis.Redis.from_url(url)
    stats = client.info("stats")
    return int(stats["total_commands_processed"]), int(stats["total_reads_processed"])


def litellm_config(path: Path, routes: dict[str, str]) -> None:
    # Master key only, no database: the cheapest LiteLLM proxy set-up (no callbacks, no spend logs).
    entries = "".join(
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: {base}\n"
        "      api_key: sk-fake-upstream\n"
        for model, base in routes.items()
    )
    path.write_text(f"model_list:\n{entries}general_settings:\n  master_key: {MASTER_KEY}\n", encoding="utf-8")


def git_commit() -> str:
    """The checked-out commit, read from .git without running git (worktrees and packed refs included)."""
    git = ROOT / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: PATH"
            git = (ROOT / git.read_text().split(":", 1)[1].strip()).resolve()
        common = git
        if (git / "commondir").exists():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head[4:].strip()
        for base in (git, common):
            if (base / ref).exists():
                return (base / ref).read_text().strip()
        for line in (common / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def versions(wrk: str, litellm: str) -> dict[str, str]:
    found = {"python": platform.python_version(), "wrk": wrk, "litellm": litellm}
    for name in (
        "django",
        "channels",
        "daphne",
        "uvicorn",
        "uvloop",
        "httptools",
        "httpx",
        "orjson",
        "redis",
    ):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    unit: str  # "rps" | "ms" | "mib" | "count" | "errors"
    values: dict[str, float | None]
    budget: str = ""
    passed: bool | None = None
    ratios: bool = True  # whether gateway/direct and gateway/litellm mean anything here
    errors: int = 0  # failed requests of the budgeted target in the scenario behind this line


class Bench:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.services: list[Service] = []
        self.targets: list[Target] = []
        self.raw: dict[str, Any] = {}
        self.notes: list[str] = []
        self.info: dict[str, Any] = {}
        self.keys_file = Path()
        self.direct_long = Target("direct", 0, "")
        self.redis_url: str | None = None
        self.redis_private = False
        self.extra: dict[str, Variant] = {}
        self.watcher: Service | None = None  # the console live view on the `watched` column
        self.watch_count = Path()
        self.watch_port = 0

    # -- set-up ------------------------------------------------------------------------------------

    def start(self, service: Service, timeout: float = 60.0, cwd: Path = ROOT) -> Service:
        return self.launch(service, cwd).wait_ready(timeout)

    def launch(self, service: Service, cwd: Path = ROOT) -> Service:
        self.services.append(service)
        return service.launch(cwd)

    def stop_all(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def setup(self, data_dir: Path) -> None:
        wrk = ensure_wrk()
        litellm_exe, litellm_version = ensure_litellm()
        self.info["versions"] = versions(wrk, litellm_version)
        log(f"data directory {data_dir}")

        routes: dict[str, str] = {}  # model -> base URL of the fake upstream answering it
        for model, tokens in MODEL_TOKENS.items():
            port = free_port()
            fake = Service(
                f"fake upstream ({tokens} tokens)",
                [sys.executable, "-m", "gateway.devtools.fake_upstream", "--port", str(port), "--tokens", str(tokens)],
                dict(os.environ),
                f"http://127.0.0.1:{port}/health",
                data_dir / f"fake-upstream-{tokens}.log",
            )
            self.start(fake)
            routes[model] = f"http://127.0.0.1:{port}/v1"
            direct = Target("direct", port, "sk-fake-upstream")
            if tokens == STREAM_SMALL:
                self.targets.append(direct)
            else:
                self.direct_long = direct  # stands in for "direct" in the 208-event scenario
        # LiteLLM takes ~15 s to start: it boots while the database is prepared.
        litellm = self.launch_litellm(litellm_exe, data_dir, routes) if litellm_exe is not None else None

        base_env = {k: v for k, v in os.environ.items() if k not in _GATEWAY_ENV_DROP}
        secrets = dict(line.split("=", 1) for line in manage(base_env, "genkeys").split() if "=" in line)
        # Empty DATABASE_URL/REDIS_URL rather than absent: a developer's .env must not fill them in.
        env = {**base_env, **secrets, "GATEWAY_DATA_DIR": str(data_dir), "DATABASE_URL": "", "REDIS_URL": ""}
        extra = env_pairs(os.environ.get("BENCH_GATEWAY_ENV", ""), "BENCH_GATEWAY_ENV")
        env.update(extra)
        self.info["gateway_env"] = extra
        manage(env, "migrate", "--noinput", "-v0")
        keys_file = data_dir / "mix-keys.txt"
        seed_args = [f"--route={model}={base}" for model, base in routes.items()]
        seed_args += ["--keys", str(MIX_KEYS), "--tenants", str(MIX_TENANTS), "--keys-file", str(keys_file)]
        seeded = subprocess.run(
            [sys.executable, "-m", "bench.seed", *seed_args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if seeded.returncode != 0:
            raise BenchError(f"seeding failed:\n{seeded.stdout[-2000:]}\n{seeded.stderr[-3000:]}")
        seed = json.loads(seeded.stdout.strip().splitlines()[-1])
        self.keys_file = keys_file
        self.info["seed"] = {k: v for k, v in seed.items() if k != "main_key"}
        self.info["gateway_settings"] = seed["settings"]
        limits = ", ".join(seed["limits"]) or "none (no limit fields in this build)"
        log(f"seeded {seed['keys']:,} keys over {seed['tenants']:,} tenants; limits set on every key: {limits}")
        log(f"gateway settings: {self.info['gateway_settings']}; extra env: {extra or 'none'}")

        variants: list[tuple[str, list[str], dict[str, str], Path]] = [("gateway", [], env, ROOT)]
        if os.environ.get("BENCH_DAPHNE", "1") != "0":
            variants.append(("daphne", ["--server", "daphne"], env, ROOT))
        redis_url = self.redis_for_bench(data_dir)
        self.redis_url = redis_url
        if redis_url:
            self.notes.append(
                "Redis variant on a private redis-server: its counters are the gateway's alone."
                if self.redis_private
                else f"Redis variant on {redis_url} (shared: its counters include other clients' commands)."
            )
            variants.append(("redis", [], {**env, "REDIS_URL": redis_url}, ROOT))
        else:
            self.notes.append("Redis variant skipped: BENCH_REDIS_URL=0, or no redis-server and no Redis on :6379.")
        if os.environ.get("BENCH_WATCHED", "1") != "0":
            # The default gateway with a console live view open on it (bench/live_watch.py):
            # what publishing every request to a watcher costs, against the `gateway` column.
            variants.append(("watched", [], env, ROOT))
        self.extra = extra_variants()
        for name, variant in self.extra.items():
            checkout = Path(variant.checkout) if variant.checkout else ROOT
            variants.append((name, [], {**env, **variant.env}, checkout))
        self.info["variants"] = {name: asdict(variant) for name, variant in self.extra.items()}
        database = f"sqlite:///{data_dir / 'gateway.sqlite3'}"  # three slashes + an absolute path
        for key, flags, variant_env, checkout in variants:
            port = free_port()
            # One data directory per column, sharing the database: each gateway's usage journal
            # is drained by its own writer, so a column's CPU figure is its own work (a shared
            # journal let one column's writer drain every column's records).
            own_dir = data_dir / f"gateway-{key}"
            own_dir.mkdir(mode=0o700)
            variant_env = {**variant_env, "GATEWAY_DATA_DIR": str(own_dir), "DATABASE_URL": database}
            # Started exactly as the README serves it: `manage.py serve` with its defaults, on a free port.
            service = Service(
                key,
                [sys.executable, "manage.py", "serve", "--port", str(port), *flags],
                variant_env,
                f"http://127.0.0.1:{port}/healthz",
                data_dir / f"{key}.log",
            )
            self.start(service, cwd=checkout)
            self.targets.append(Target(key, port, seed["main_key"], service))
            log(f"{key} serving on port {port} (pid {service.pid})")
            if key == "watched":
                self.watch(port, own_dir, seed["operator"], seed["operator_password"])

        if litellm is not None:
            self.check_litellm(litellm, litellm_version)
        else:
            self.notes.append(f"LiteLLM not measured: {litellm_version}.")

    def watch(self, port: int, own_dir: Path, username: str, password: str) -> None:
        """Open a console live view on the gateway at ``port``, signed in as ``username``, in a
        process of its own (bench/live_watch.py) that counts the lines it receives."""
        password_file = own_dir / "operator-password"
        password_file.write_text(password, encoding="utf-8")
        password_file.chmod(0o600)
        self.watch_count = own_dir / "live-lines"
        args = [sys.executable, "-m", "bench.live_watch", "--port", str(port), "--username", username]
        args += ["--password-file", str(password_file), "--count-file", str(self.watch_count)]
        count = self.watch_count
        watcher = Service("live view", args, dict(os.environ), "", own_dir / "live-watch.log", count.exists)
        self.start(watcher, timeout=30)
        self.watcher = watcher
        self.watch_port = port
        log(f"console live view watching `watched` (pid {watcher.pid})")

    def live_lines(self) -> None:
        """Lines the live view received against the requests the watched gateway answered
        (its ``/metrics``), read at the end of the run: every line should have arrived."""
        if self.watcher is None:
            return
        with urllib.request.urlopen(f"http://127.0.0.1:{self.watch_port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        answered = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("gateway_requests_total{") and 'route="responses"' in line
        )
        time.sleep(1.5)  # the watcher saves its count once a second
        self.watcher.stop()
        received = int(self.watch_count.read_text(encoding="ascii") or 0)
        self.info["live_view"] = {"lines": received, "requests": answered}
        log(f"live view: {received:,} lines for {answered:,.0f} requests")

    def redis_for_bench(self, data_dir: Path) -> str | None:
        """The Redis of the Redis-mode variant: BENCH_REDIS_URL, else a private ``redis-server`` (so its
        counters are the gateway's alone), else database 14 of a Redis on :6379; None: no such variant."""
        configured = os.environ.get("BENCH_REDIS_URL")
        if configured is not None:
            self.redis_private = False
            return configured if configured not in ("", "0") else None
        server = shutil.which("redis-server")
        if server is not None:
            port = free_port()
            args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            redis = Service(
                "redis-server", args, dict(os.environ), "", data_dir / "redis.log", lambda: redis_pings(port)
            )
            self.start(redis)
            self.redis_private = True
            return f"redis://127.0.0.1:{port}/0"
        if redis_pings(6379):
            self.redis_private = False
            return "redis://127.0.0.1:6379/14"
        return None

    def launch_litellm(self, exe: Path, data_dir: Path, routes: dict[str, str]) -> Service:
        config = data_dir / "litellm.yaml"
        litellm_config(config, routes)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
        # Errors-only logging (cheaper than its default INFO access log) and the bundled model cost map:
        # the proxy must not fetch anything from the internet.
        env.update(LITELLM_LOG="ERROR", LITELLM_LOCAL_MODEL_COST_MAP="True")
        args = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
        service = Service("litellm", args, env, f"http://127.0.0.1:{port}/health/liveliness", data_dir / "litellm.log")
        return self.launch(service, cwd=data_dir)  # its cwd: it may write files there

    def check_litellm(self, service: Service, version: str) -> None:
        """Wait for LiteLLM and add it as a target if it really forwards the Responses API call."""
        try:
            service.wait_ready(timeout=180)
        except BenchError as exc:
            log(f"LiteLLM did not start; continuing without it: {exc}")
            self.notes.append("LiteLLM did not start (see its log in the data directory).")
            return
        port = int(service.ready_url.split(":")[2].split("/")[0])
        # Its answers take ~100x longer than the gateway's: longer runs give it enough completed requests.
        target = Target("litellm", port, MASTER_KEY, service, min_seconds=3)
        # It must really forward the Responses API call to the fake upstream's /v1/responses.
        fake_port = self.targets[0].port
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{fake_port}/_fake/reset", method="POST"))
        _, _, status, reply = RawHttp(port).post(MASTER_KEY, body().encode())
        with urllib.request.urlopen(f"http://127.0.0.1:{fake_port}/_fake/requests") as answer:
            seen = json.loads(answer.read())
        paths = [entry.get("path") for entry in seen]
        if status != 200 or "/v1/responses" not in paths:
            log(f"LiteLLM answered {status} ({reply[:300]!r}); upstream saw {paths}: continuing without it")
            self.notes.append(f"LiteLLM excluded: answered {status}, upstream saw {paths}.")
            return
        log(f"litellm {version} serving on port {port} (pid {service.pid}); forwards POST /v1/responses unchanged")
        self.notes.append(f"LiteLLM {version} forwards POST /v1/responses to the fake upstream's /v1/responses.")
        self.targets.append(target)

    # -- scenarios ---------------------------------------------------------------------------------

    def for_tokens(self, target: Target, tokens: int) -> Target:
        """``target``, or for "direct" the fake upstream that answers with ``tokens`` tokens."""
        return self.direct_long if target.key == "direct" and tokens == STREAM_LARGE else target

    def target(self, key: str) -> Target | None:
        return next((t for t in self.targets if t.key == key), None)

    def warm_up(self) -> None:
        for target in self.targets:
            run_wrk(target, 16, 1, body(), exact=True)  # opens the gateway's upstream connections
            for tokens in (STREAM_SMALL, STREAM_LARGE):
                client = RawHttp(self.for_tokens(target, tokens).port)
                _, _, status, payload = client.post(target.auth, body(True, tokens).encode())
                client.close()
                if status != 200:
                    raise BenchError(f"{target.key} answered {status} to a stream: {payload[:300]!r}")
                target.events[tokens] = count_events(payload)
            wait_quiet(target.pids)
        counts = {t.key: t.events for t in self.targets}
        log(f"warmed up; SSE events per response (tokens -> events): {counts}")
        self.raw["events_per_response"] = counts

    def latency(self) -> None:
        p = self.plan
        runs = interleave(
            "latency @1", self.targets, p.latency_rounds, lambda t: run_wrk(t, 1, p.seconds, body()), "p50_ms"
        )
        self.raw["latency_c1"] = {k: [asdict(r) for r in v] for k, v in runs.items()}

    def throughputs(self) -> None:
        self.throughput(16)
        self.throughput(64)

    def streams(self) -> None:
        self.streaming(STREAM_SMALL)
        self.streaming(STREAM_LARGE)

    def throughput(self, connections: int) -> None:
        def measure(target: Target) -> WrkResult:
            before = redis_stats(self.redis_url) if target.key == "redis" and self.redis_url else None
            pids = target.pids
            cpu = [cpu_seconds(pid) for pid in pids]
            result = run_wrk(target, connections, self.plan.seconds, body())
            if pids and result.requests:
                # CPU time of the server and its children (the usage writer) per answer: less
                # sensitive than req/s to what else the machine is doing. Read once the writer
                # has caught up, so that the run's records are all paid for; the server's own
                # share is its own row.
                wait_quiet(pids)
                spent = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu, strict=True)]
                result.extra["cpu_us_per_request"] = sum(spent) * 1e6 / result.requests
                result.extra["server_cpu_us_per_request"] = spent[0] * 1e6 / result.requests
            if before is not None and self.redis_url and result.requests:
                after = redis_stats(self.redis_url)
                # -1: the second INFO counts the first one (one command, one read).
                result.extra["redis_commands_per_request"] = (after[0] - before[0] - 1) / result.requests
                result.extra["redis_round_trips_per_request"] = (after[1] - before[1] - 1) / result.requests
            return result

        runs = interleave(f"req/s @{connections}", self.targets, self.plan.rounds, measure)
        self.raw[f"throughput_c{connections}"] = {k: [asdict(r) for r in v] for k, v in runs.items()}

    def streaming(self, tokens: int) -> None:
        runs = interleave(
            f"stream {tokens} tokens @16",
            [self.for_tokens(t, tokens) for t in self.targets],
            self.plan.rounds,
            lambda t: run_wrk(t, 16, self.plan.seconds, body(True, tokens)),
        )
        self.raw[f"stream{tokens}_c16"] = {k: [asdict(r) for r in v] for k, v in runs.items()}

    def ttfb(self) -> None:
        """First body byte of a 28-event stream, one request at a time, targets interleaved request by request."""
        payload = body(True, STREAM_SMALL).encode()
        clients = {t.key: RawHttp(t.port) for t in self.targets}
        samples: dict[str, list[float]] = {t.key: [] for t in self.targets}
        totals: dict[str, list[float]] = {t.key: [] for t in self.targets}
        for i in range(self.plan.ttfb_samples + 5):
            for target in rotated(self.targets, i):
                first, total, status, _ = clients[target.key].post(target.auth, payload)
                if status != 200:
                    raise BenchError(f"{target.key} answered {status} while measuring first bytes")
                if i >= 5:  # the first rounds warm connections and caches
                    samples[target.key].append(first * 1000)
                    totals[target.key].append(total * 1000)
        for client in clients.values():
            client.close()
        for target in self.targets:
            wait_quiet(target.pids)
        self.raw["ttfb_stream_c1_ms"] = {k: summary(v) for k, v in samples.items()}
        self.raw["stream_total_c1_ms"] = {k: summary(v) for k, v in totals.items()}
        shown = " | ".join(f"{k} {v['p50']:.2f} ms" for k, v in self.raw["ttfb_stream_c1_ms"].items())
        log(f"first byte p50 @1 (stream, {self.plan.ttfb_samples} samples): {shown}")

    def key_mix(self) -> None:
        # LiteLLM has no keys without a database (master key only), so it sits this one out.
        targets = [t for t in self.targets if t.key != "litellm"]
        # First use: the keys in turn, each one's first request (a database read, then cached), until
        # every key was used once. The first run's rate is the "first use" line; the measured rounds
        # that follow see the steady state of a gateway that has served its keys before.
        first: dict[str, list[WrkResult]] = {}
        for target in targets:
            used = 0
            while used < MIX_KEYS:
                run = run_wrk(target, 16, 2, body(), self.keys_file, exact=True, keys_from=used)
                if not run.requests:
                    raise BenchError(f"{target.key} answered nothing while its keys were first used")
                first.setdefault(target.key, []).append(run)
                used += run.requests
            wait_quiet(target.pids)
        self.raw["keymix_first_use_c16"] = {k: [asdict(r) for r in v] for k, v in first.items()}
        log("key mix first use: " + " | ".join(f"{k} {v[0].rps:,.0f} req/s" for k, v in first.items()))
        runs = interleave(
            f"key mix ({MIX_KEYS:,} keys, Zipf 1.1) @16",
            targets,
            self.plan.rounds,
            lambda t: run_wrk(t, 16, self.plan.seconds, body(), self.keys_file),
        )
        self.raw["keymix_c16"] = {k: [asdict(r) for r in v] for k, v in runs.items()}

    def websocket(self) -> None:
        """Streamed responses on 16 persistent connections: WebSocket (the gateway's
        /v1/responses socket) against SSE, both driven by the same asyncio client
        (bench/socket_load.py), with SSE straight to the fake upstream as the no-gateway line."""
        payload = body(False, STREAM_SMALL)
        gateway = [t for t in self.targets if t.key == "gateway"]
        sse_targets = [t for t in self.targets if t.key in ("direct", "gateway")]
        seconds = self.plan.seconds
        ws_runs = interleave(
            "WebSocket stream @16", gateway, self.plan.rounds, lambda t: run_socket_load("ws", t, 16, seconds, payload)
        )
        sse_runs = interleave(
            "SSE stream, same client @16",
            sse_targets,
            self.plan.rounds,
            lambda t: run_socket_load("sse", t, 16, seconds, payload),
        )
        self.raw["ws_stream_c16"] = {k: [asdict(r) for r in v] for k, v in ws_runs.items()}
        self.raw["sse_client_stream_c16"] = {k: [asdict(r) for r in v] for k, v in sse_runs.items()}

    def memory(self) -> None:
        target = self.target("gateway")
        assert target is not None
        assert target.service is not None
        pid = target.service.pid
        runs = self.raw.get("throughput_c16", {}).get("gateway", [])
        rate = median([good_rps(r) for r in runs]) if runs else 500.0
        wait_quiet(target.pids)
        # RSS of the gateway process plus its children (the usage writer): usage that piles up
        # anywhere counts.
        before, before_children = tree_rss_mib(pid)
        samples: list[tuple[float, float]] = []
        child_samples: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            start = time.monotonic()
            while not stop.wait(0.5):
                with contextlib.suppress(OSError):
                    own, children = tree_rss_mib(pid)
                    samples.append((time.monotonic() - start, own + children))
                    child_samples.append(children)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        total, errors, started = 0, 0, time.monotonic()
        deadline = started + self.plan.memory_max_seconds
        while total < self.plan.memory_requests and time.monotonic() < deadline:
            # Chunks of at most 10 s, re-estimating the rate: a noisy estimate costs one chunk at most.
            seconds = max(1, min(10, math.ceil((self.plan.memory_requests - total) / rate * 1.02)))
            result = run_wrk(target, 16, seconds, body())
            total += result.requests
            errors += result.errors
            if result.requests == 0:
                raise BenchError("the gateway stopped answering during the memory run")
            rate = result.rps
        load_seconds = time.monotonic() - started
        if total < self.plan.memory_requests:
            self.notes.append(
                f"Memory run stopped after {self.plan.memory_max_seconds}s at {total:,} of "
                f"{self.plan.memory_requests:,} requests (the gateway ran at {total / load_seconds:,.0f} req/s)."
            )
        stop.set()
        sampler.join()
        end, end_children = tree_rss_mib(pid)
        wait_quiet(target.pids, max_wait=30)
        time.sleep(self.plan.idle_pause)
        idle, idle_children = tree_rss_mib(pid)
        before, end, idle = before + before_children, end + end_children, idle + idle_children
        mid = min(samples, key=lambda s: abs(s[0] - load_seconds / 2))[1] if samples else math.nan
        peak = max((s[1] for s in samples), default=end)
        self.raw["memory"] = {
            "requests": total,
            "errors": errors,
            "load_seconds": load_seconds,
            "rss_before_mib": before,
            "rss_mid_mib": mid,
            "rss_peak_mib": peak,
            "rss_end_mib": end,
            "rss_after_idle_mib": idle,
            "children_rss_mib": {"before": before_children, "end": end_children, "idle": idle_children},
            "samples": [(round(t, 1), round(rss, 1)) for t, rss in samples],
        }
        log(
            f"memory: {total:,} requests in {load_seconds:.0f}s; RSS before {before:.1f} MiB, half-way {mid:.1f}, "
            f"peak {peak:.1f}, end {end:.1f}, after {self.plan.idle_pause:.0f}s idle {idle:.1f}"
        )

    # -- report ------------------------------------------------------------------------------------

    def medians(self, scenario: str, attr: str) -> dict[str, float | None]:
        runs = self.raw.get(scenario, {})
        out: dict[str, float | None] = {}
        for key, results in runs.items():
            values = [good_rps(r) if attr == "rps" else r[attr] for r in results if r["requests"]]
            out[key] = median(values) if values else None
        return out

    def added(self, scenario: str, attr: str) -> dict[str, float | None]:
        """Median over rounds of (target - direct) measured in the same round."""
        runs = self.raw.get(scenario, {})
        direct = runs.get("direct", [])
        out: dict[str, float | None] = {}
        for key, results in runs.items():
            if key == "direct":
                continue
            diffs = [r[attr] - d[attr] for r, d in zip(results, direct, strict=False)]
            out[key] = median(diffs) if diffs else None
        return out

    def errors(self, scenario: str) -> dict[str, int]:
        """Failed requests (answers >= 400 and socket errors) per target over a scenario's runs."""
        if scenario == "memory":
            memory = self.raw.get("memory")
            return {"gateway": int(memory["errors"])} if memory else {}
        return {key: sum(run_errors(r) for r in runs) for key, runs in self.raw.get(scenario, {}).items()}

    def rows(self) -> list[Row]:
        rows: list[Row] = []
        litellm = self.target("litellm") is not None

        def budget(
            row: Row, text: str, check: Callable[[float], bool], scenario: str | None, column: str = "gateway"
        ) -> Row:
            """A budget line: the value must pass ``check`` and the scenario must have had no failed request."""
            row.budget = text
            value = row.values.get(column)
            row.errors = self.errors(scenario).get(column, 0) if scenario else 0
            if value is None or math.isnan(value):
                row.passed = False if row.errors else None
            else:
                row.passed = check(value) and not row.errors
            return row

        thr16, thr64 = self.medians("throughput_c16", "rps"), self.medians("throughput_c64", "rps")
        ceiling = max(v for v in (thr16.get("direct"), thr64.get("direct"), 0.0) if v is not None)
        rows.append(Row("fake upstream ceiling (req/s)", "rps", {"direct": ceiling}, ratios=False))
        for quantile, most_added in (("p50", 1.5), ("p99", 5.0)):
            rows.append(Row(f"latency {quantile} @1 (ms)", "ms", self.medians("latency_c1", f"{quantile}_ms")))
            added = Row(f"added {quantile} @1 (ms)", "ms", self.added("latency_c1", f"{quantile}_ms"))
            rows.append(budget(added, f"<= {most_added:g}", functools.partial(operator.ge, most_added), "latency_c1"))
        row16 = Row("req/s @16", "rps", thr16)
        litellm16 = thr16.get("litellm")
        if litellm and litellm16:
            budget(row16, ">= 1000, >= 6x litellm", lambda v: v >= 1000 and v >= 6 * litellm16, "throughput_c16")
        else:
            budget(row16, ">= 1000", lambda v: v >= 1000, "throughput_c16")
        rows.append(row16)
        rows.append(Row("req/s @64", "rps", thr64))
        for extra, label in (
            ("cpu_us_per_request", "server CPU per request @16 (µs)"),
            ("server_cpu_us_per_request", "  of which the serving process (µs)"),
        ):
            cpu: dict[str, float | None] = {}
            for key, runs in self.raw.get("throughput_c16", {}).items():
                values = [r["extra"][extra] for r in runs if extra in r["extra"]]
                if values:
                    cpu[key] = median(values)
            if cpu:
                rows.append(Row(label, "us", cpu, ratios=False))
        for tokens in (STREAM_SMALL, STREAM_LARGE):
            resp = self.medians(f"stream{tokens}_c16", "rps")
            events = {k: (v * self.events_of(k, tokens) if v is not None else None) for k, v in resp.items()}
            label = f"stream {tokens + 8} ev: resp/s @16"
            row = Row(label, "rps", resp)
            if tokens == STREAM_SMALL:
                budget(row, ">= 800", lambda v: v >= 800, f"stream{tokens}_c16")
            rows.append(row)
            rows.append(Row(f"stream {tokens + 8} ev: events/s @16", "rps", events))
        if "ws_stream_c16" in self.raw:
            label = f"stream {STREAM_SMALL + 8} ev"
            sse = Row(
                f"{label} over SSE, asyncio client: resp/s @16", "rps", self.medians("sse_client_stream_c16", "rps")
            )
            rows.append(sse)
            ws = Row(f"{label} over WebSocket, same client: resp/s @16", "rps", self.medians("ws_stream_c16", "rps"))
            rows.append(budget(ws, ">= 500", lambda v: v >= 500, "ws_stream_c16"))
        ttfb: dict[str, float | None] = {k: v["p50"] for k, v in self.raw.get("ttfb_stream_c1_ms", {}).items()}
        rows.append(Row("stream first byte p50 @1 (ms)", "ms", ttfb))
        direct_ttfb = ttfb.get("direct")
        added_ttfb: dict[str, float | None] = {
            k: v - direct_ttfb for k, v in ttfb.items() if k != "direct" and v is not None and direct_ttfb is not None
        }
        # The first-byte client stops the run at the first answer that is not 200: no errors to count.
        rows.append(budget(Row("added first byte p50 @1 (ms)", "ms", added_ttfb), "<= 2", lambda v: v <= 2.0, None))
        # The first run of the pass only: its every request was a key's first use.
        first_use: dict[str, float | None] = {
            k: good_rps(v[0]) for k, v in self.raw.get("keymix_first_use_c16", {}).items() if v
        }
        rows.append(Row(f"key mix first use of {MIX_KEYS // 1000}k keys req/s @16", "rps", first_use))
        rows.append(Row(f"key mix {MIX_KEYS // 1000}k keys req/s @16", "rps", self.medians("keymix_c16", "rps")))
        rows.append(Row("key mix p99 @16 (ms)", "ms", self.medians("keymix_c16", "p99_ms")))
        memory = self.raw.get("memory")
        if memory:
            rows.append(Row("RSS+writer before load (MiB)", "mib", {"gateway": memory["rss_before_mib"]}, ratios=False))
            rows.append(Row("RSS+writer peak during (MiB)", "mib", {"gateway": memory["rss_peak_mib"]}, ratios=False))
            rows.append(
                Row(
                    f"RSS+writer after {memory['requests'] // 1000}k req (MiB)",
                    "mib",
                    {"gateway": memory["rss_end_mib"]},
                    ratios=False,
                )
            )
            rows.append(
                Row("RSS+writer after idle (MiB)", "mib", {"gateway": memory["rss_after_idle_mib"]}, ratios=False)
            )
            late = {"gateway": memory["rss_end_mib"] - memory["rss_mid_mib"]}
            row = Row("RSS+writer growth, 2nd half (MiB)", "mib", late, ratios=False)
            rows.append(budget(row, "<= 16", lambda v: v <= MEMORY_GROWTH_LIMIT_MIB, "memory"))
        totals: dict[str, float | None] = {}
        for scenario in (*WRK_SCENARIOS, "memory"):
            for key, count in self.errors(scenario).items():
                totals[key] = (totals.get(key) or 0) + count
        rows.append(Row("failed requests, all wrk runs", "errors", totals, ratios=False))
        live = self.info.get("live_view")
        if live and live["requests"]:
            # 1.000: the console live view received a line for every request the gateway answered.
            lines = {"watched": live["lines"] / live["requests"]}
            rows.append(Row("live view lines / requests answered", "ratio", lines, ratios=False))
        redis_runs = [r["extra"] for r in self.raw.get("throughput_c16", {}).get("redis", [])]
        trips = [e["redis_round_trips_per_request"] for e in redis_runs if "redis_round_trips_per_request" in e]
        commands = [e["redis_commands_per_request"] for e in redis_runs if "redis_commands_per_request" in e]
        if trips:
            # Server-side socket reads are an upper bound on the gateway's round trips: they include its
            # background work (usage XADD batches, the stream drainer, health writes, new connections).
            # The budget line itself (<= 1 per request) is asserted exactly, client-side, by
            # tests/test_hot_path_queries.py.
            reads: dict[str, float | None] = {"redis": median(trips)}
            rows.append(Row("Redis reads/request @16 (all)", "count", reads, budget="<= 1: see test", ratios=False))
            rows.append(Row("Redis commands/request @16", "count", {"redis": median(commands)}, ratios=False))
        return rows

    def events_of(self, key: str, tokens: int) -> int:
        target = self.target(key)
        return target.events.get(tokens, tokens + 8) if target else tokens + 8


def fmt(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit == "rps":
        return f"{value:,.0f}"
    if unit == "count":
        return f"{value:.2f}"
    if unit == "errors":
        return f"{value:,.0f}"
    if unit in ("mib", "us"):
        return f"{value:,.1f}"
    if unit == "ratio":
        return f"{value:.3f}"
    return f"{value:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return "-"
    value = a / b
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def table(rows: Sequence[Row], extra: Sequence[str] = ()) -> list[list[str]]:
    """The printed table: ``extra`` are the BENCH_VARIANTS columns, between watched and litellm."""
    lines = [["scenario", "direct", "gateway", "gw/direct", "daphne", "redis", "watched", *extra, "litellm"]]
    lines[0] += ["gw/litellm"]
    lines[0] += ["budget", "pass"]
    for row in rows:
        v = row.values
        lines.append(
            [
                row.label,
                fmt(v.get("direct"), row.unit),
                fmt(v.get("gateway"), row.unit),
                ratio(v.get("gateway"), v.get("direct")) if row.ratios else "-",
                fmt(v.get("daphne"), row.unit),
                fmt(v.get("redis"), row.unit),
                fmt(v.get("watched"), row.unit),
                *(fmt(v.get(name), row.unit) for name in extra),
                fmt(v.get("litellm"), row.unit),
                ratio(v.get("gateway"), v.get("litellm")) if row.ratios else "-",
                row.budget or "-",
                f"FAIL: {row.errors:,} errors" if row.errors else {True: "ok", False: "FAIL", None: "-"}[row.passed],
            ]
        )
    return lines


def render(lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        cells = [cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line)]
        out.append("| " + " | ".join(cells) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


@contextlib.contextmanager
def data_directory() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    keep = os.environ.get("BENCH_KEEP") == "1"
    try:
        yield path
    except BaseException:
        keep = True  # the process logs are what explains a failure
        raise
    finally:
        if keep:
            log(f"kept the data directory and process logs: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def _terminated(signum: int, frame: object) -> None:
    # SIGTERM's default would end this process at once, leaving the services it started running.
    raise SystemExit(128 + signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _terminated)
    plan = QUICK if os.environ.get("BENCH_QUICK") == "1" else FULL
    if os.environ.get("BENCH_MEMORY_REQUESTS"):
        plan = replace(plan, memory_requests=int(os.environ["BENCH_MEMORY_REQUESTS"]))
    if os.environ.get("BENCH_ROUNDS"):  # more interleaved rounds: A/B of close columns on a noisy machine
        plan = replace(plan, rounds=max(1, int(os.environ["BENCH_ROUNDS"])))
    started = datetime.now(UTC)
    only = selected_scenarios()
    if only == {"scale"}:
        from bench import scale

        return scale.run()
    mach = machine()  # now, for the load average at the start
    bench = Bench(plan)
    log(f"{'quick' if plan.quick else 'full'} run: {plan}")
    try:
        with data_directory() as data_dir:
            try:
                bench.setup(data_dir)
                bench.warm_up()
                scenarios: list[tuple[str, Callable[[], None]]] = [
                    ("latency", bench.latency),
                    ("throughput", bench.throughputs),
                    ("streaming", bench.streams),
                    ("ttfb", bench.ttfb),
                    ("keymix", bench.key_mix),
                    ("websocket", bench.websocket),
                    ("memory", bench.memory),
                ]
                for name, run in scenarios:
                    if only is None or name in only:
                        run()
                for target in bench.targets:
                    if target.service is not None and not target.service.alive():
                        raise BenchError(f"{target.key} died during the run; log:\n{target.service.tail()}")
                bench.live_lines()
            finally:
                bench.stop_all()
    except BenchError as exc:
        log(f"benchmark failed: {exc}")
        return 2

    rows = bench.rows()
    lines = table(rows, list(bench.extra))
    elapsed = (datetime.now(UTC) - started).total_seconds()
    info = bench.info
    versions_line = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if k != "wrk")
    print()
    print(render(lines))
    print()
    print("gateway = `manage.py serve` defaults (uvicorn); daphne = `--server daphne`; redis = REDIS_URL set;")
    print("watched = the defaults with a console live view open (bench/live_watch.py, BENCH_WATCHED=0 skips it).")
    print(f"gateway settings: {info['gateway_settings']}; extra env: {info['gateway_env'] or 'none'}")
    limits = ", ".join(info["seed"]["limits"]) or "none (no limit fields in this build)"
    print(f"usage metering on; limits set (generous) on every key and tenant: {limits}")
    print("hot path database queries for a cached key: 0 (asserted by tests/test_hot_path_queries.py)")
    for scenario in (*WRK_SCENARIOS, "memory"):
        for key, count in bench.errors(scenario).items():
            if count:
                print(f"ERRORS: {scenario}: {key}: {count:,} failed requests (answers >= 400 or socket errors)")
    for note in bench.notes:
        print(note)
    print(
        f"{mach['nproc']} CPUs ({mach['cpu_model']}), {mach['memory_gib']} GiB; "
        f"{info['versions']['wrk']}; {versions_line}"
    )
    load = f"load average {mach['loadavg_at_start'][0]:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    print(f"{'quick' if plan.quick else 'full'} run, {elapsed:.0f}s, {load}, commit {git_commit()[:12]}")
    failed = [row.label for row in rows if row.passed is False]
    print("budget: " + ("all lines pass" if not failed else "FAILED: " + "; ".join(failed)))

    mach["loadavg_at_end"] = list(os.getloadavg())
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{stamp}{'-quick' if plan.quick else ''}.json"
    document = {
        "started": started.isoformat(),
        "duration_s": elapsed,
        "plan": asdict(plan),
        "commit": git_commit(),
        "machine": mach,
        "versions": info["versions"],
        "gateway_settings": info["gateway_settings"],
        "gateway_env": info["gateway_env"],
        "variants": info.get("variants", {}),
        "seed": info["seed"],
        "notes": bench.notes,
        "table": [dict(zip(lines[0], line, strict=True)) for line in lines[1:]],
        "rows": [asdict(row) for row in rows],
        "budget_failed": failed,
        "raw": bench.raw,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"written {path.relative_to(ROOT)}")
    code = 1 if failed and os.environ.get("BENCH_STRICT") == "1" else 0
    if only is None or "scale" in only:
        from bench import scale

        code = max(code, scale.run())
    return code


if __name__ == "__main__":
    sys.exit(main())
