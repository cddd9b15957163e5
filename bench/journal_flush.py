"""What appending usage to the journal costs, by flush policy: a small A/B load test.

    .venv/bin/python -m bench.journal_flush [--seconds 5] [--rounds 3] [--variants "timer:0.05 iteration:0"]

Each variant is a gateway (embedded, uvicorn, as ``manage.py serve`` runs it) with its own
``GATEWAY_USAGE_FLUSH_SECONDS``: ``0.05`` appends the buffered records every 50 ms, ``0``
appends them at the next event-loop iteration. ``wrk`` (bench/wrk_bench.lua) loads one
variant at a time, interleaved over ``--rounds``, at 1 and 16 connections. Per run it
reports throughput, wrk's p50/p99, the serving process's CPU time per request (from
/proc/PID/stat) and its write syscalls per request (``syscw`` of /proc/PID/io: the journal
appends plus the socket writes, the same for both variants but for the appends). Medians
of the rounds are printed as a table. It needs ``wrk`` and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.run import (
    ROOT,
    Service,
    Target,
    WrkResult,
    body,
    cpu_seconds,
    data_directory,
    free_port,
    manage,
    run_wrk,
    wait_quiet,
)


def write_syscalls(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    return 0


def measure(target: Target, connections: int, seconds: int) -> tuple[WrkResult, float, float]:
    """One wrk run: the result, CPU microseconds and write syscalls per request of the serving process."""
    assert target.service is not None
    pid = target.service.pid
    cpu, writes = cpu_seconds(pid), write_syscalls(pid)
    result = run_wrk(target, connections, seconds, body(), exact=True)
    per = max(result.requests, 1)
    return result, (cpu_seconds(pid) - cpu) * 1e6 / per, (write_syscalls(pid) - writes) / per


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.journal_flush", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="timer:0.05 iteration:0", help="NAME:FLUSH_SECONDS ...")
    args = parser.parse_args()
    variants = dict(item.split(":", 1) for item in args.variants.split())
    with data_directory() as data_dir:
        services: list[Service] = []
        try:
            port = free_port()
            fake = Service(
                "fake upstream",
                [sys.executable, "-m", "gateway.devtools.fake_upstream", "--port", str(port), "--tokens", "20"],
                {},
                f"http://127.0.0.1:{port}/health",
                data_dir / "fake.log",
            )
            services.append(fake.launch().wait_ready())
            env = {"PATH": "/usr/bin:/bin", "GATEWAY_DATA_DIR": str(data_dir), "DATABASE_URL": "", "REDIS_URL": ""}
            env.update(line.split("=", 1) for line in manage(env, "genkeys").split() if "=" in line)
            manage(env, "migrate", "--noinput", "-v0")
            seeded = subprocess.run(
                [sys.executable, "-m", "bench.seed", f"--route=gpt-4.1=http://127.0.0.1:{port}/v1"]
                + ["--keys", "1", "--tenants", "1", "--keys-file", str(data_dir / "keys.txt")],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            key = json.loads(seeded.stdout.strip().splitlines()[-1])["main_key"]
            targets = []
            for name, flush in variants.items():
                gateway_port = free_port()
                service = Service(
                    name,
                    [sys.executable, "manage.py", "serve", "--port", str(gateway_port)],
                    {**env, "GATEWAY_USAGE_FLUSH_SECONDS": flush},
                    f"http://127.0.0.1:{gateway_port}/healthz",
                    data_dir / f"{name}.log",
                )
                services.append(service.launch().wait_ready())
                targets.append(Target(name, gateway_port, key, service))
            rows: dict[tuple[str, int], list[tuple[WrkResult, float, float]]] = {}
            for target in targets:  # warm-up: the first requests load the snapshot and seed the budgets
                run_wrk(target, 4, 1, body(), exact=True)
            for rnd in range(args.rounds):
                for connections in (1, 16):
                    order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
                    for target in order:
                        wait_quiet(target.pids)
                        rows.setdefault((target.key, connections), []).append(
                            measure(target, connections, args.seconds)
                        )
            print(
                f"{'variant':<10} {'conns':>5} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>10} {'writes/req':>10}"
            )
            for (name, connections), runs in rows.items():
                print(
                    f"{name:<10} {connections:>5} {statistics.median(r.rps for r, _, _ in runs):>8,.0f}"
                    f" {statistics.median(r.p50_ms for r, _, _ in runs):>7.2f}"
                    f" {statistics.median(r.p99_ms for r, _, _ in runs):>7.2f}"
                    f" {statistics.median(c for _, c, _ in runs):>10.0f}"
                    f" {statistics.median(w for _, _, w in runs):>10.2f}"
                )
        finally:
            for service in reversed(services):
                service.stop()


if __name__ == "__main__":
    main()
