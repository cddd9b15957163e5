"""The scale scenario of ``make bench``: a gateway over a database of a million keys.

``BENCH_ONLY=scale make bench`` runs it alone (``python -m bench.scale`` too). One uvicorn
gateway process, in-process limits (no Redis), on PostgreSQL (so that the key table's own
statistics count the reads the gateway makes of it), the fake upstream, wrk with 16
connections. Reported side by side, with the budget of issue 11:

- first answer after start: against an empty database and against ``BENCH_SCALE_KEYS`` keys
  (from spawning the process to its first ``POST /v1/responses`` answered);
- req/s and p99 of one key with no changes, and while one key is created and one revoked
  every second (interleaved rounds): churn throughput >= 90% and p99 <= 2x;
- RSS at start, after 100,000 distinct keys used, and after 1,000 changes (no growth beyond
  noise: at most 5% + 5 MiB);
- an unknown-prefix flood (10,000 random well-formed keys, every answer must be 401) against
  the same client with valid keys: >= 90% of its rate, and at most 1% of the flood's requests
  reach the key table (its sequential scans and the scans of its indexes but the primary key,
  from PostgreSQL's statistics: the foreign-key checks of usage records do not count).

Keys are seeded with ``COPY`` (a million rows in well under a minute). Environment:
``BENCH_SCALE_KEYS`` (default 1,000,000; ``BENCH_QUICK=1``: 100,000),
``BENCH_SCALE_DATABASE_URL`` (default ``postgres://postgres@127.0.0.1:5432/bench_scale``; the
database and ``<name>_empty`` are dropped and created), ``BENCH_STRICT=1`` (exit 1 when a
budget line fails). Results go to ``bench/results/<UTC timestamp>-scale.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench.run import (
    RESULTS,
    ROOT,
    BenchError,
    Service,
    ensure_wrk,
    free_port,
    git_commit,
    log,
    manage,
    parse_wrk,
    rss_mib,
)

MODEL = "gpt-4.1"
BODY = json.dumps({"model": MODEL, "input": "Say hello to the scale benchmark."}, separators=(",", ":"))
LUA = Path(__file__).resolve().parent / "wrk_bench.lua"
ALPHABET = string.ascii_letters + string.digits
ROUND_SECONDS = 10
DISTINCT_KEYS = 100_000
FLOOD_KEYS = 10_000
CHANGES = 1_000


def database_urls() -> tuple[str, str]:
    url = os.environ.get("BENCH_SCALE_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/bench_scale")
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    return url, urlunsplit(parts._replace(path=f"/{name}_empty"))


def recreate(url: str) -> None:
    """Drop and create the database of ``url`` (through the server's ``postgres`` database)."""
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def base_env(data_dir: Path, database_url: str) -> dict[str, str]:
    from cryptography.fernet import Fernet

    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "REDIS_URL", "DATABASE_URL"))}
    env.update(
        DJANGO_SETTINGS_MODULE="gateway.conf.settings",
        DATABASE_URL=database_url,
        GATEWAY_DATA_DIR=str(data_dir),
        SECRET_KEY=secrets.token_urlsafe(48),
        GATEWAY_ENCRYPTION_KEY=Fernet.generate_key().decode(),
        ALLOWED_HOSTS="127.0.0.1,localhost",
    )
    return env


def setup_small(env: dict[str, str], upstream: str) -> str:
    """Migrate, then one tenant, one account serving MODEL and one key (returned) through the commands."""
    manage(env, "migrate", "--noinput")
    manage(env, "tenant_create", "bench", "--name", "Bench")
    manage(env, "upstream_add", "main", "--base-url", upstream, "--models", MODEL, "--api-key", "sk-fake-upstream")
    return manage(env, "apikey_create", "bench", "--name", "main").strip().splitlines()[-1]


def random_key(rng: random.Random) -> tuple[str, str]:
    """A well-formed key (as tenancy.keys.generate_api_key shapes it) and its prefix."""
    from tenancy.keys import KEY_MARKER, PREFIX_LENGTH, PREFIX_RANDOM_LENGTH, SECRET_LENGTH

    secret = KEY_MARKER + "".join(rng.choices(ALPHABET, k=PREFIX_RANDOM_LENGTH + SECRET_LENGTH))
    return secret, secret[:PREFIX_LENGTH]


def key_row_template(now: Any) -> tuple[list[Any], list[Any]]:
    """ApiKey's columns (but the id) and a row's values for COPY: tenant, prefix and digest to
    fill in per key; every other column its default, NULL or empty. A new column this cannot
    fill is a BenchError (tests/unit/test_bench.py builds it against the current model)."""
    from tenancy.models import ApiKey

    given = {"tenant": None, "name": "scale", "prefix": None, "digest": None, "allowed_models": "[]"}
    fields = [f for f in ApiKey._meta.concrete_fields if not f.primary_key]
    template: list[Any] = []
    for f in fields:
        if f.name in given:
            template.append(given[f.name])
        elif f.name == "created_at":
            template.append(now)
        elif f.null:
            template.append(None)
        elif f.has_default():
            default = f.get_default()
            template.append(json.dumps(default) if f.get_internal_type() == "JSONField" else default)
        elif f.blank and f.empty_strings_allowed:  # a text field left empty (the key was never rotated)
            template.append("")
        else:
            raise BenchError(f"bench/scale.py does not know what to put in ApiKey.{f.name}")
    return fields, template


def bulk_keys(count: int, tenants: int, keep: int) -> list[str]:
    """COPY ``count`` keys over ``tenants`` new tenants; return the secrets of the first ``keep``."""
    from django.db import connection, transaction
    from django.utils import timezone

    from gateway.config import notify
    from tenancy.keys import key_digest
    from tenancy.models import ApiKey, Tenant

    rng = random.Random(os.urandom(16))
    mix = Tenant.objects.bulk_create([Tenant(slug=f"scale-{i:05d}", name=f"Scale {i}") for i in range(tenants)])
    fields, template = key_row_template(timezone.now())
    at = {f.name: i for i, f in enumerate(fields)}
    columns = ", ".join(f'"{f.column}"' for f in fields)
    kept: list[str] = []
    seen: set[str] = set()
    with transaction.atomic(), connection.cursor() as cursor:
        raw = cursor.cursor  # psycopg's own cursor: COPY
        with raw.copy(f'COPY "{ApiKey._meta.db_table}" ({columns}) FROM STDIN') as copy:
            while len(seen) < count:
                secret, prefix = random_key(rng)
                if prefix in seen:
                    continue
                seen.add(prefix)
                row = list(template)
                row[at["tenant"]] = mix[len(seen) % tenants].pk
                row[at["prefix"]] = prefix
                row[at["digest"]] = key_digest(secret)
                copy.write_row(row)
                if len(kept) < keep:
                    kept.append(secret)
        cursor.execute(f'ANALYZE "{ApiKey._meta.db_table}"')
    notify.config_changed()
    return kept


def key_table_reads() -> int:
    """Reads of the key table by anything but its primary key, so far (PostgreSQL's statistics).

    Sequential scans plus the scans of every index but the primary key's: a key looked up by
    its prefix counts; the foreign-key checks of usage records written meanwhile (a primary
    key lookup each) do not.
    """
    from django.db import connection

    from tenancy.models import ApiKey

    table = ApiKey._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute("SELECT coalesce(seq_scan, 0) FROM pg_stat_user_tables WHERE relname = %s", [table])
        row = cursor.fetchone()
        cursor.execute(
            "SELECT coalesce(sum(s.idx_scan), 0) FROM pg_stat_user_indexes s "
            "JOIN pg_index i ON i.indexrelid = s.indexrelid WHERE s.relname = %s AND NOT i.indisprimary",
            [table],
        )
        indexed = cursor.fetchone()
    return (int(row[0]) if row else 0) + (int(indexed[0]) if indexed else 0)


def settled_reads() -> int:
    """:func:`key_table_reads` once every backend has flushed its statistics (an idle one
    flushes within 10 s in PostgreSQL 15)."""
    time.sleep(11)
    return key_table_reads()


def start_gateway(env: dict[str, str], data_dir: Path, name: str) -> tuple[Service, float]:
    """A gateway process and the seconds from spawning it to its first answered request."""
    port = free_port()
    service = Service(
        name,
        [sys.executable, "manage.py", "serve", "--port", str(port)],
        env,
        f"http://127.0.0.1:{port}/healthz",
        data_dir / f"{name}.log",
    )
    return service, 0.0


def first_answer(service: Service, key: str) -> float:
    """Spawn ``service``; the seconds until its first ``POST /v1/responses`` got a 200."""
    import httpx

    started = time.monotonic()
    service.launch()
    port = service.ready_url.split(":")[2].split("/")[0]
    url = f"http://127.0.0.1:{port}/v1/responses"
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    deadline = started + 120
    while time.monotonic() < deadline:
        if not service.alive():
            raise BenchError(f"{service.name} exited at start; log:\n{service.tail()}")
        try:
            if httpx.post(url, content=BODY, headers=headers, timeout=30).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            time.sleep(0.02)
    raise BenchError(f"{service.name}: no 200 within 120 s; log:\n{service.tail()}")


def wrk(url: str, *, key: str | None = None, keys_file: Path | None = None, expect: int = 200) -> dict[str, Any]:
    env = dict(os.environ, WRK_BODY=BODY, WRK_EXPECT=str(expect), WRK_THREADS="2")
    if keys_file is not None:
        env.update(WRK_KEYS_FILE=str(keys_file), WRK_KEYS_ORDER="turn")
    else:
        assert key is not None
        env["WRK_AUTH"] = key
    args = ["wrk", "-t2", "-c16", f"-d{ROUND_SECONDS}s", "--timeout", "30s", "-s", str(LUA), url]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=ROUND_SECONDS + 90, check=False)
    if done.returncode != 0:
        raise BenchError(f"wrk failed: {done.stdout[-500:]} {done.stderr[-500:]}")
    result = parse_wrk(done.stdout)
    unexpected = next(
        (json.loads(line[11:]) for line in done.stdout.splitlines() if line.startswith("UNEXPECTED ")), {"count": 0}
    )
    return {
        "requests": result.requests,
        "rps": result.requests / result.seconds if result.seconds else 0.0,
        "p99_ms": result.p99_ms,
        "socket_errors": result.socket_errors,
        "unexpected": int(unexpected["count"]) + result.socket_errors,
    }


@contextlib.contextmanager
def churning(tenant_slug: str, revocable: list[str]) -> Iterator[dict[str, int]]:
    """While the block runs: one key created and one revoked every second, through the services."""
    from tenancy.models import ApiKey, Tenant
    from tenancy.services.keys import apikey_create, apikey_revoke

    tenant = Tenant.objects.get(slug=tenant_slug)
    stop = threading.Event()
    done = {"created": 0, "revoked": 0}

    def loop() -> None:
        from django.db import connection

        try:
            while not stop.wait(1.0):
                apikey_create(tenant=tenant, name="churn")
                done["created"] += 1
                if revocable:
                    apikey_revoke(api_key=ApiKey.objects.get(prefix=revocable.pop()))
                    done["revoked"] += 1
        finally:
            connection.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join(30)


def changes(count: int, tenant_slug: str, revocable: list[str], url: str, key: str) -> None:
    """``count`` changes (half creations, half revocations), each seen by a request."""
    import httpx

    from tenancy.models import ApiKey, Tenant
    from tenancy.services.keys import apikey_create, apikey_revoke

    tenant = Tenant.objects.get(slug=tenant_slug)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    with httpx.Client(timeout=30) as client:
        for i in range(count):
            if i % 2 or not revocable:
                apikey_create(tenant=tenant, name="change")
            else:
                apikey_revoke(api_key=ApiKey.objects.get(prefix=revocable.pop()))
            if client.post(url, content=BODY, headers=headers).status_code != 200:
                raise BenchError("a request failed during the 1,000 changes")


def budget(rows: list[dict[str, Any]], label: str, value: str, passed: bool) -> None:
    rows.append({"line": label, "value": value, "passed": passed})


def run() -> int:
    quick = os.environ.get("BENCH_QUICK") == "1"
    count = int(os.environ.get("BENCH_SCALE_KEYS") or (100_000 if quick else 1_000_000))
    ensure_wrk()
    big_url, empty_url = database_urls()
    started = datetime.now(UTC)
    report: dict[str, Any] = {"keys": count, "commit": git_commit(), "started": started.isoformat()}
    data_dir = Path(tempfile.mkdtemp(prefix="gw-bench-scale-"))
    services: list[Service] = []
    try:
        upstream_port = free_port()
        fake = Service(
            "fake upstream",
            [sys.executable, "-m", "gateway.devtools.fake_upstream", "--port", str(upstream_port)],
            dict(os.environ),
            f"http://127.0.0.1:{upstream_port}/health",
            data_dir / "fake.log",
        )
        services.append(fake.launch().wait_ready())
        upstream = f"http://127.0.0.1:{upstream_port}/v1"

        log("scale: the empty database")
        recreate(empty_url)
        empty_dir = data_dir / "empty"
        empty_env = base_env(empty_dir, empty_url)
        empty_key = setup_small(empty_env, upstream)
        gateway, _ = start_gateway(empty_env, empty_dir, "gateway-empty")
        services.append(gateway)
        report["first_answer_empty_s"] = first_answer(gateway, empty_key)
        gateway.stop()

        log(f"scale: seeding {count:,} keys")
        recreate(big_url)
        big_dir = data_dir / "big"
        env = base_env(big_dir, big_url)
        main_key = setup_small(env, upstream)
        os.environ.update({k: env[k] for k in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "GATEWAY_DATA_DIR")})
        os.environ.update(SECRET_KEY=env["SECRET_KEY"], GATEWAY_ENCRYPTION_KEY=env["GATEWAY_ENCRYPTION_KEY"])
        import django

        django.setup()
        seeded = time.monotonic()
        kept = bulk_keys(count, 1_000, DISTINCT_KEYS + FLOOD_KEYS + 2 * CHANGES)
        report["seed_s"] = time.monotonic() - seeded
        distinct_file = big_dir / "distinct.keys"
        distinct_file.write_text("\n".join(kept[:DISTINCT_KEYS]) + "\n")
        warm_file = big_dir / "warm.keys"
        warm_file.write_text("\n".join(kept[:FLOOD_KEYS]) + "\n")
        rng = random.Random(7)
        flood_file = big_dir / "flood.keys"
        flood_file.write_text("\n".join(random_key(rng)[0] for _ in range(FLOOD_KEYS)) + "\n")
        from tenancy.keys import key_prefix

        revocable = [p for p in (key_prefix(k) for k in kept[DISTINCT_KEYS + FLOOD_KEYS :]) if p]

        log("scale: starting the gateway")
        gateway, _ = start_gateway(env, big_dir, "gateway-big")
        services.append(gateway)
        report["first_answer_big_s"] = first_answer(gateway, main_key)
        report["rss_start_mib"] = rss_mib(gateway.pid)
        url = gateway.ready_url.replace("/healthz", "/v1/responses")

        log("scale: one key, no changes / one created and one revoked every second (interleaved)")
        calm: list[dict[str, Any]] = []
        churn: list[dict[str, Any]] = []
        for _ in range(2):
            calm.append(wrk(url, key=main_key))
            with churning("bench", revocable) as made:
                churn.append(wrk(url, key=main_key))
            churn[-1]["changes"] = dict(made)
        report["calm"], report["churn"] = calm, churn

        log(f"scale: {DISTINCT_KEYS:,} distinct keys")
        distinct = wrk(url, keys_file=distinct_file)
        rounds = 1
        while distinct["requests"] < DISTINCT_KEYS and rounds < 15:  # each key used once, in turn
            more = wrk(url, keys_file=distinct_file)
            distinct["requests"] += more["requests"]
            distinct["unexpected"] += more["unexpected"]
            rounds += 1
        report["distinct"] = distinct
        report["rss_after_distinct_mib"] = rss_mib(gateway.pid)

        log("scale: valid keys against an unknown-prefix flood")
        warm = wrk(url, keys_file=warm_file)
        before = settled_reads()
        flood = wrk(url, keys_file=flood_file, expect=401)
        flood["key_table_reads"] = settled_reads() - before
        report["warm"], report["flood"] = warm, flood

        log(f"scale: {CHANGES:,} changes")
        rss_before_changes = rss_mib(gateway.pid)
        changes(CHANGES, "bench", revocable, url, main_key)
        time.sleep(2)
        report["rss_before_changes_mib"] = rss_before_changes
        report["rss_after_changes_mib"] = rss_mib(gateway.pid)
        if not gateway.alive():
            raise BenchError(f"the gateway died; log:\n{gateway.tail()}")
    except BenchError as exc:
        log(f"scale benchmark failed: {exc}")
        return 2
    finally:
        for service in reversed(services):
            service.stop()
        if os.environ.get("BENCH_KEEP") != "1":
            shutil.rmtree(data_dir, ignore_errors=True)

    rows: list[dict[str, Any]] = []
    calm_rps = sorted(r["rps"] for r in report["calm"])[-1]
    churn_rps = sorted(r["rps"] for r in report["churn"])[-1]
    calm_p99 = min(r["p99_ms"] for r in report["calm"])
    churn_p99 = min(r["p99_ms"] for r in report["churn"])
    errors = sum(r["unexpected"] for r in (*report["calm"], *report["churn"]))
    budget(
        rows,
        "churn req/s >= 90% of no churn",
        f"{churn_rps:,.0f} vs {calm_rps:,.0f}",
        churn_rps >= 0.9 * calm_rps and not errors,
    )
    budget(
        rows,
        "churn p99 <= 2x no churn",
        f"{churn_p99:.2f} ms vs {calm_p99:.2f} ms",
        churn_p99 <= 2 * calm_p99 and not errors,
    )
    grow = report["rss_after_changes_mib"] - report["rss_before_changes_mib"]
    budget(
        rows,
        f"RSS after {CHANGES:,} changes: no growth beyond noise (5% + 5 MiB)",
        f"{report['rss_before_changes_mib']:.0f} -> {report['rss_after_changes_mib']:.0f} MiB",
        grow <= 0.05 * report["rss_before_changes_mib"] + 5,
    )
    flood, warm = report["flood"], report["warm"]
    budget(
        rows,
        "flood refused at >= 90% of the valid-key rate",
        f"{flood['rps']:,.0f} vs {warm['rps']:,.0f} req/s",
        flood["rps"] >= 0.9 * warm["rps"] and not flood["unexpected"] and not warm["unexpected"],
    )
    budget(
        rows,
        "flood requests reaching the key table <= 1%",
        f"{flood['key_table_reads']:,} of {flood['requests']:,}",
        flood["key_table_reads"] <= 0.01 * flood["requests"],
    )
    report["budget"] = rows
    print()
    print(f"scale: {count:,} keys (seeded in {report['seed_s']:.0f} s), one uvicorn process, PostgreSQL, no Redis")
    empty_s, big_s = report["first_answer_empty_s"], report["first_answer_big_s"]
    print(f"first answer after start: {empty_s:.2f} s empty, {big_s:.2f} s with {count:,} keys")
    used = min(report["distinct"]["requests"], DISTINCT_KEYS)
    print(
        f"RSS: {report['rss_start_mib']:.0f} MiB at start, {report['rss_after_distinct_mib']:.0f} MiB after "
        f"{used:,} distinct keys, {report['rss_after_changes_mib']:.0f} MiB after {CHANGES:,} changes"
    )
    for row in rows:
        print(f"{'ok  ' if row['passed'] else 'FAIL'} {row['line']}: {row['value']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{started.strftime('%Y%m%dT%H%M%SZ')}{'-quick' if quick else ''}-scale.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"written: {out.relative_to(ROOT)}")
    failed = [row["line"] for row in rows if not row["passed"]]
    return 1 if failed and os.environ.get("BENCH_STRICT") == "1" else 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
