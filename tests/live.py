"""Live processes for integration tests: real servers on real loopback sockets."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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

    def start(self) -> LiveProcess:
        handle = open(self.log, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT)
        wait_http(self.ready_url, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
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


@contextlib.contextmanager
def running(process: LiveProcess) -> Iterator[LiveProcess]:
    process.start()
    try:
        yield process
    finally:
        process.stop()


def fake_upstream(port: int, env: dict[str, str], log: Path, *extra: str) -> LiveProcess:
    args = [sys.executable, "-m", "gateway.fake_upstream", "--port", str(port), *extra]
    return LiveProcess(args, env, f"http://127.0.0.1:{port}/health", log)


def gateway(port: int, env: dict[str, str], log: Path, server: str = "uvicorn") -> LiveProcess:
    args = [sys.executable, "manage.py", "serve", "--port", str(port), "--server", server]
    return LiveProcess(args, env, f"http://127.0.0.1:{port}/healthz", log)


def child_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(overrides)
    return env
