"""Limits, budgets and metering through live gateways.

Part (a) drives the session's gateway and runs in both modes (embedded: SQLite + in-process
state; production: PostgreSQL + Redis): rate limits, concurrency, the key policy, budgets in
tokens and money, alerts, operator changes applied on the next request, refunds and
``GET /v1/usage``.

Part (b) needs PostgreSQL and Redis (skipped otherwise): a second gateway process shares the
limits with the first, exactly; budgets hold under concurrent load across both; and the usage
in the database equals, token for token, what the upstream reported, across a PostgreSQL
restart and a SIGTERM of one gateway mid-load. Run with ``pytest -s`` to see the figures.

Rate windows are epoch minutes: tests that count requests first make sure enough of the
current minute is left (:func:`minute_room`), so that a window turning over cannot change
their counts.
"""

from __future__ import annotations

import collections
import functools
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from django.conf import settings
from django.core.management import call_command

from tests import harness as live
from tests.conftest import DATA_DIR, MODEL, FakeUpstream, Live
from tests.harness import assert_error, poll

pytestmark = pytest.mark.live

REDIS = bool(settings.REDIS_URL)
TWO_REPLICAS = os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")) and bool(
    os.environ.get("REDIS_URL")
)
needs_replicas = pytest.mark.skipif(
    not TWO_REPLICAS, reason="two-replica tests need DATABASE_URL=postgres://... and REDIS_URL"
)

DURATION = re.compile(r"^(\d+h)?(\d+m)?\d+(\.\d+)?(ms|s)$")
RATE_HEADERS = tuple(
    f"x-ratelimit-{what}-{unit}" for unit in ("requests", "tokens") for what in ("limit", "remaining", "reset")
)
TOKEN_COLUMNS = (
    "input_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
)


# --- helpers ----------------------------------------------------------------------------------


def forget_counters(*scopes: tuple[str, int]) -> None:
    """Drop the Redis limit counters of ``(name, id)`` scopes.

    Ids restart with every test database while Redis keeps counters (budgets for a whole
    window): a key of this run must not inherit the counters of an earlier run's, even when
    the Redis database was not emptied in between.
    """
    if not REDIS:
        return
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        for name, ident in scopes:
            stale = list(client.scan_iter(match=f"gw:rl:{name}:{ident}:*", count=1000))
            if stale:
                client.delete(*stale)
    finally:
        client.close()


def new_key(gw: Live, tenant: Any = None, **limits: Any) -> tuple[Any, str]:
    """A key with ``limits`` (of the owner's tenant unless ``tenant``), with fresh counters."""
    from tenancy.services.keys import apikey_create

    api_key, secret = apikey_create(tenant=tenant or gw.owner.tenant, name="limited", **limits)
    forget_counters(("key", api_key.id))
    return api_key, secret


def new_tenant(slug: str, **limits: Any) -> Any:
    from tenancy.services.tenants import tenant_create

    tenant = tenant_create(slug=slug, **limits)
    forget_counters(("tenant", tenant.id))
    return tenant


def minute_room(seconds: float) -> None:
    """Wait, if needed, until at least ``seconds`` of the current rate window are left."""
    left = 60 - time.time() % 60
    if left < seconds:
        time.sleep(left + 0.05)


def body_bytes(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body)


def reservation(body: dict[str, Any], max_output_tokens: int | None = None) -> int:
    """The token estimate the gateway reserves for ``body`` (gateway.limits.engine.estimate_tokens)."""
    output = max_output_tokens if max_output_tokens is not None else body.get("max_output_tokens")
    if output is None:
        output = settings.GATEWAY_DEFAULT_OUTPUT_RESERVE
    return len(body_bytes(body)) // 4 + 1 + int(output)


def send(url: str, key: str, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
    """``POST /v1/responses`` with exactly the bytes of :func:`body_bytes` (what the estimate counts)."""
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    return httpx.post(url + "/v1/responses", content=body_bytes(body), headers=headers, timeout=timeout)


# Calls of GET /v1/usage answered per key: each counts against the key's (and tenant's) rpm.
USAGE_CALLS: collections.Counter[str] = collections.Counter()


def usage_of(url: str, key: str) -> dict[str, Any]:
    response = httpx.get(url + "/v1/usage", headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == 200, response.text
    USAGE_CALLS[key] += 1
    return dict(response.json())


def scope_report(report: dict[str, Any], scope: str) -> dict[str, Any]:
    matches = [entry for entry in report["limits"] if entry["scope"] == scope]
    assert len(matches) == 1, report["limits"]
    return dict(matches[0])


def budget_spent(url: str, key: str, scope: str = "key", unit: str = "tokens") -> Any:
    return scope_report(usage_of(url, key), scope)["budget"][unit]["spent"]


def assert_rate_headers(response: httpx.Response, *, requests: bool = True, tokens: bool = False) -> None:
    """The x-ratelimit-* trio of each limited dimension, well formed (and no trio for the others)."""
    for unit, present in (("requests", requests), ("tokens", tokens)):
        names = [name for name in RATE_HEADERS if name.endswith(unit)]
        if not present:
            assert not any(name in response.headers for name in names), response.headers
            continue
        for name in names:
            assert name in response.headers, (name, response.headers)
        assert int(response.headers[f"x-ratelimit-limit-{unit}"]) >= 1
        assert int(response.headers[f"x-ratelimit-remaining-{unit}"]) >= 0
        assert DURATION.match(response.headers[f"x-ratelimit-reset-{unit}"]), response.headers


def assert_retry_after(response: httpx.Response, at_most: float) -> int:
    retry = int(response.headers["retry-after"])
    assert 1 <= retry <= at_most, response.headers
    assert int(response.headers["retry-after-ms"]) >= 1
    return retry


def records_of(api_key: Any) -> list[Any]:
    from tenancy.models import UsageRecord

    return list(UsageRecord.objects.filter(api_key_id=api_key.id).order_by("id"))


def tokens_in_db(api_key: Any) -> dict[str, int]:
    from django.db.models import Sum

    from tenancy.models import UsageRecord

    sums = UsageRecord.objects.filter(api_key_id=api_key.id).aggregate(**{n: Sum(n) for n in TOKEN_COLUMNS})
    return {name: int(sums[name] or 0) for name in TOKEN_COLUMNS}


def tokens_of_tenant(tenant: Any) -> int:
    from django.db.models import Sum

    from tenancy.models import UsageRecord

    return int(UsageRecord.objects.filter(tenant_id=tenant.id).aggregate(n=Sum("total_tokens"))["n"] or 0)


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def parallel(calls: Sequence[Callable[[], httpx.Response]], workers: int) -> list[httpx.Response]:
    """Run ``calls`` on ``workers`` threads, all released at once; results in order."""
    gate = threading.Barrier(min(workers, len(calls)))

    def run(call: Callable[[], httpx.Response], index: int) -> httpx.Response:
        if index < workers:
            gate.wait(timeout=30)
        return call()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run, call, index) for index, call in enumerate(calls)]
        return [future.result() for future in futures]


def wait_alert(api_key: Any, kind: str) -> Any:
    """The budget alert of ``kind`` for a key, once the gateway recorded it."""
    from tenancy.models import BudgetAlert

    return poll(
        lambda: BudgetAlert.objects.filter(scope="key", scope_id=api_key.id, kind=kind).first(), what=f"{kind} alert"
    )


def wait_settled(gw: Live | str, key: str, scope: str = "key") -> None:
    """Wait until no request of ``key`` holds a concurrency lease: its settlement is applied
    (with Redis, settlements are applied in the background, leases and budgets together)."""
    url = gw if isinstance(gw, str) else gw.url
    poll(
        lambda: scope_report(usage_of(url, key), scope)["concurrent_requests"]["in_use"] == 0,
        timeout=10,
        what="settlements applied",
    )


# --- (a) one gateway, both modes: rate limits -----------------------------------------------------


def test_key_rpm_429_with_retry_after_and_rate_headers(live_gw: Live) -> None:
    api_key, key = new_key(live_gw, rpm=3)
    minute_room(15)
    before = live_gw.upstream.stats()["requests"]
    served = [
        send(live_gw.url, key, {"model": MODEL, "input": "one"}),
        send(live_gw.url, key, {"model": MODEL, "input": "two", "stream": True}),
        send(live_gw.url, key, {"model": MODEL, "input": "three"}),
    ]
    for left, response in zip((2, 1, 0), served, strict=True):
        assert response.status_code == 200, response.text
        assert_rate_headers(response)
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        assert response.headers["x-ratelimit-remaining-requests"] == str(left)
    refused = send(live_gw.url, key, {"model": MODEL, "input": "four"})
    error = assert_error(refused, 429, "rate_limit_exceeded", type="rate_limit_error", param="key.rpm")
    assert "key.rpm" in error["message"]
    assert_retry_after(refused, 60)
    assert_rate_headers(refused)
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # A refused request never reaches an upstream, and is metered as rejected.
    assert live_gw.upstream.stats()["requests"] == before + 3
    record = live_gw.wait_usage(refused.headers["x-request-id"])
    assert (record.status_code, record.outcome, record.total_tokens) == (429, "rejected", None)
    # No limit on tokens: no token headers; an unlimited key gets none at all.
    free = live_gw.post({"model": MODEL, "input": "free"})
    assert free.status_code == 200
    assert not any(name in free.headers for name in RATE_HEADERS)
    # (Records are written in order: the refusal's is there, so are the others'.)
    assert [(r.status_code, r.outcome) for r in records_of(api_key)] == [(200, "completed")] * 3 + [(429, "rejected")]


def test_tenant_rpm_is_shared_by_its_keys(live_gw: Live) -> None:
    from tenancy.services.tenants import tenant_update

    tenant = new_tenant("team")
    _, first = new_key(live_gw, tenant=tenant)
    _, second = new_key(live_gw, tenant=tenant, rpm=100)
    tenant_update(tenant=tenant, rpm=2)  # an operator lowers the tenant below a key's own limit
    minute_room(15)
    one = send(live_gw.url, first, {"model": MODEL, "input": "a"})
    two = send(live_gw.url, second, {"model": MODEL, "input": "b"})
    assert (one.status_code, two.status_code) == (200, 200)
    # The most constrained scope is reported: the tenant's 2, not the key's 100.
    assert two.headers["x-ratelimit-limit-requests"] == "2"
    assert two.headers["x-ratelimit-remaining-requests"] == "0"
    for key in (first, second):
        refused = send(live_gw.url, key, {"model": MODEL, "input": "c"})
        assert_error(refused, 429, "rate_limit_exceeded", type="rate_limit_error", param="tenant.rpm")
        assert_retry_after(refused, 60)
        assert_rate_headers(refused)
    # Another tenant is not affected.
    assert live_gw.post({"model": MODEL, "input": "d"}).status_code == 200


def test_tpm_counts_the_estimate_then_the_real_usage(live_gw: Live) -> None:
    _, key = new_key(live_gw, tpm=1000)
    minute_room(25)
    too_big = {"model": MODEL, "input": "big", "max_output_tokens": 2000}
    refused = send(live_gw.url, key, too_big)
    error = assert_error(refused, 429, "rate_limit_exceeded", type="rate_limit_error", param="key.tpm")
    assert "key.tpm" in error["message"]
    assert_retry_after(refused, 60)
    assert_rate_headers(refused, requests=False, tokens=True)
    assert refused.headers["x-ratelimit-remaining-tokens"] == "1000"  # a refusal counts nothing

    # A slow request holds its whole estimate while it runs...
    slow = {"model": MODEL, "input": "slow", "max_output_tokens": 550, "metadata": {"fake_latency_ms": "1500"}}
    estimate = reservation(slow)
    assert 500 < estimate <= 1000 < 2 * estimate
    before = live_gw.upstream.stats()["requests"]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(send, live_gw.url, key, slow)
        poll(lambda: live_gw.upstream.stats()["requests"] > before, what="slow request upstream")
        assert not pending.done(), pending.result().text
        second = send(live_gw.url, key, {**slow, "input": "second"})
        assert_error(second, 429, "rate_limit_exceeded", type="rate_limit_error", param="key.tpm")
        first = pending.result()
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-remaining-tokens"] == str(1000 - estimate)
    # ...and once it ended, only what it really used counts.
    used = first.json()["usage"]["total_tokens"]
    assert used < estimate
    poll(
        lambda: scope_report(usage_of(live_gw.url, key), "key")["tokens_per_minute"]["remaining"] == 1000 - used,
        what="tpm corrected to the real usage",
    )
    again = {**slow, "input": "again", "metadata": {}}
    response = send(live_gw.url, key, again)
    assert response.status_code == 200, response.text
    assert response.headers["x-ratelimit-remaining-tokens"] == str(1000 - used - reservation(again))


def test_concurrency_limit_serves_exactly_n(live_gw: Live) -> None:
    limit = 3
    _, key = new_key(live_gw, concurrency=limit)
    slow = {"model": MODEL, "input": "slow", "metadata": {"fake_latency_ms": "2000"}}
    responses = parallel([lambda: send(live_gw.url, key, slow) for _ in range(limit + 1)], workers=limit + 1)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * limit + [429], [r.text for r in responses]
    refused = next(r for r in responses if r.status_code == 429)
    error = assert_error(refused, 429, "rate_limit_exceeded", type="rate_limit_error", param="key.concurrency")
    assert "key.concurrency" in error["message"]
    assert_retry_after(refused, 1)
    # The slots come back when the requests end.
    wait_settled(live_gw, key)
    assert send(live_gw.url, key, {"model": MODEL, "input": "after"}).status_code == 200


# --- key policy ---------------------------------------------------------------------------------


def test_max_output_tokens_cap_clamps_where_forwarded(live_gw: Live) -> None:
    from accounts import services as account_services

    account_services.pool_set_strip_fields(pool=live_gw.account.pool, fields=[])  # forward max_output_tokens
    _, key = new_key(live_gw, max_output_tokens=20)
    for asked, forwarded in ((100, 20), (None, 20), (16, 16)):
        request: dict[str, Any] = {"model": MODEL, "input": f"cap {asked}", "metadata": {"fake_tokens": "40"}}
        if asked is not None:
            request["max_output_tokens"] = asked
        response = send(live_gw.url, key, request)
        assert response.status_code == 200, response.text
        assert live_gw.upstream.last_request()["body"]["max_output_tokens"] == forwarded
        assert response.json()["usage"]["output_tokens"] == forwarded
        assert response.json()["status"] == "incomplete"
    # Keys without a cap are forwarded what they ask.
    response = live_gw.post({"model": MODEL, "input": "uncapped", "max_output_tokens": 100})
    assert response.status_code == 200
    assert live_gw.upstream.last_request()["body"]["max_output_tokens"] == 100


def test_max_output_tokens_cap_bounds_the_estimate_where_stripped(live_gw: Live) -> None:
    # The default pool strips max_output_tokens: the cap still bounds the reservation.
    capped_row, capped = new_key(live_gw, max_output_tokens=50, tpm=400, budget_tokens=400)
    _, uncapped = new_key(live_gw, tpm=400)
    minute_room(15)
    huge = {"model": MODEL, "input": "huge", "max_output_tokens": 100_000}
    response = send(live_gw.url, capped, huge)
    assert response.status_code == 200, response.text
    assert "max_output_tokens" not in live_gw.upstream.last_request()["body"]
    assert response.headers["x-ratelimit-remaining-tokens"] == str(400 - reservation(huge, 50))
    assert_error(
        send(live_gw.url, uncapped, huge), 429, "rate_limit_exceeded", type="rate_limit_error", param="key.tpm"
    )
    record = live_gw.wait_usage(response.headers["x-request-id"])
    assert record.api_key_id == capped_row.id


def test_reasoning_effort_allowlist(live_gw: Live) -> None:
    _, key = new_key(live_gw, reasoning_efforts=["low", "medium"])
    before = live_gw.upstream.stats()["requests"]
    refused = send(live_gw.url, key, {"model": MODEL, "input": "think", "reasoning": {"effort": "high"}})
    error = assert_error(refused, 403, "reasoning_effort_not_allowed", param="reasoning.effort")
    assert "high" in error["message"]
    assert live_gw.upstream.stats()["requests"] == before
    assert send(live_gw.url, key, {"model": MODEL, "input": "t", "reasoning": {"effort": "low"}}).status_code == 200
    assert send(live_gw.url, key, {"model": MODEL, "input": "no reasoning"}).status_code == 200
    record = live_gw.wait_usage(refused.headers["x-request-id"])
    assert (record.status_code, record.outcome) == (403, "rejected")


def test_tool_type_allowlist(live_gw: Live) -> None:
    _, key = new_key(live_gw, allowed_tools=["function"])
    _, no_tools = new_key(live_gw, allowed_tools=[])
    function = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}
    allowed = send(live_gw.url, key, {"model": MODEL, "input": "use it", "tools": [function]})
    assert allowed.status_code == 200, allowed.text
    refused = send(live_gw.url, key, {"model": MODEL, "input": "search", "tools": [function, {"type": "web_search"}]})
    assert_error(refused, 403, "tool_not_allowed", param="tools[1].type")
    assert_error(
        send(live_gw.url, no_tools, {"model": MODEL, "input": "x", "tools": [function]}),
        403,
        "tool_not_allowed",
        param="tools[0].type",
    )
    assert send(live_gw.url, no_tools, {"model": MODEL, "input": "no tools"}).status_code == 200


def test_ip_allowlist(live_gw: Live) -> None:
    _, loopback = new_key(live_gw, allowed_ips=["127.0.0.1/32"])
    _, private = new_key(live_gw, allowed_ips=["10.0.0.0/8"])
    assert send(live_gw.url, loopback, {"model": MODEL, "input": "from loopback"}).status_code == 200
    before = live_gw.upstream.stats()["requests"]
    refused = send(live_gw.url, private, {"model": MODEL, "input": "from loopback"})
    assert_error(refused, 403, "ip_not_allowed", type="permission_error")
    assert live_gw.upstream.stats()["requests"] == before


# --- budgets ----------------------------------------------------------------------------------------


def test_token_budget_blocks_with_budget_exceeded(live_gw: Live) -> None:

    budget = 150
    api_key, key = new_key(live_gw, budget_tokens=budget, concurrency=5)
    request = {"model": MODEL, "input": "spend", "max_output_tokens": 40}
    estimate = reservation(request)
    spent = 0
    served = 0
    while True:
        response = send(live_gw.url, key, request)
        if response.status_code != 200:
            break
        served += 1
        spent += response.json()["usage"]["total_tokens"]
        wait_settled(live_gw, key)
        assert budget_spent(live_gw.url, key) == spent
        assert served < 50
    error = assert_error(response, 429, "budget_exceeded", type="insufficient_quota", param="key.budget")
    assert "budget" in error["message"]
    assert_retry_after(response, 32 * 86400)
    # Refused exactly when the next reservation would not fit; never beyond the budget.
    assert spent <= budget < spent + estimate
    assert served >= 1
    # The first refusal records the hard alert.
    alert = wait_alert(api_key, "hard")
    assert alert.limit_tokens == budget
    assert (alert.tenant_id, alert.metric) == (live_gw.owner.tenant.id, "tokens")
    for record in (live_gw.wait_usage(r) for r in [response.headers["x-request-id"]]):
        assert (record.status_code, record.outcome) == (429, "rejected")
    assert sum(r.total_tokens or 0 for r in records_of(api_key)) == spent


def test_usd_budget_with_versioned_prices(live_gw: Live) -> None:
    from tenancy.models import PriceVersion

    # Old price first, then the current one: requests are priced with the current one.
    call_command(
        "price_set", MODEL, "--input", "5", "--cached-input", "5", "--cache-write", "5", "--output", "5",
        "--effective-from", "2020-01-01",
    )  # fmt: skip
    call_command("price_set", MODEL, "--input", "1000", "--cached-input", "500", "--cache-write", "1000",
                 "--output", "1000")  # fmt: skip
    price = PriceVersion.objects.filter(model=MODEL).latest("effective_from")
    _, key = new_key(live_gw, budget_usd="0.1", concurrency=5)
    request = {"model": MODEL, "input": "spend money", "max_output_tokens": 20}
    estimate_usd = Decimal(reservation(request)) / 1000  # $1000 per million tokens, any kind
    spent = Decimal(0)
    while True:
        response = send(live_gw.url, key, request)
        if response.status_code != 200:
            break
        usage = response.json()["usage"]
        record = live_gw.wait_usage(response.headers["x-request-id"])
        # Cost from the price table, the price version stored with it.
        assert record.cost == Decimal(usage["total_tokens"]) / 1000
        assert record.price_version_id == price.id
        spent += record.cost
        wait_settled(live_gw, key)
        assert Decimal(budget_spent(live_gw.url, key, unit="usd")) == spent
    assert_error(response, 429, "budget_exceeded", type="insufficient_quota", param="key.budget")
    assert spent <= Decimal("0.1") < spent + estimate_usd
    assert spent > 0
    report = scope_report(usage_of(live_gw.url, key), "key")["budget"]["usd"]
    assert (Decimal(report["limit"]), Decimal(report["remaining"])) == (Decimal("0.1"), Decimal("0.1") - spent)


def test_soft_alert_is_recorded_once(live_gw: Live) -> None:
    from tenancy.models import BudgetAlert

    api_key, key = new_key(live_gw, budget_tokens=400, budget_soft_percent=10, concurrency=5)
    request = {"model": MODEL, "input": "alerting", "max_output_tokens": 20}
    threshold = 40
    spent = 0
    while spent < threshold:
        response = send(live_gw.url, key, request)
        assert response.status_code == 200, response.text
        spent += response.json()["usage"]["total_tokens"]
    alert = wait_alert(api_key, "soft")
    assert alert.limit_tokens == 400
    assert threshold <= alert.spent_tokens <= spent
    assert alert.tenant_id == live_gw.owner.tenant.id
    # More spend past the threshold records nothing more.
    for _ in range(3):
        assert send(live_gw.url, key, request).status_code == 200
    wait_settled(live_gw, key)
    live_gw.drain_usage()
    alerts = BudgetAlert.objects.filter(scope="key", scope_id=api_key.id)
    assert list(alerts.values_list("kind", flat=True)) == ["soft"]


class Webhook:
    """A local HTTP server recording the JSON POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                hook.bodies.append(orjson.loads(self.rfile.read(length)))
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


@pytest.mark.parametrize("worker", ["eager", "celery child"])
def test_alerts_are_sent_to_the_webhook_once(
    live_gw: Live, start_gateway: Callable[..., live.LiveProcess], webhook: Webhook, worker: str
) -> None:
    """Delivered by the gateway itself (eager), or by the Celery worker ``serve --celery`` runs (``make run``)."""
    from tenancy.models import BudgetAlert

    if worker == "eager":
        gateway = start_gateway(GATEWAY_ALERT_WEBHOOK_URL=webhook.url, CELERY_TASK_ALWAYS_EAGER="1")
    else:
        gateway = start_gateway(args=("--celery",), GATEWAY_ALERT_WEBHOOK_URL=webhook.url)
    api_key, key = new_key(live_gw, budget_tokens=120, budget_soft_percent=30, concurrency=5)
    request = {"model": MODEL, "input": "hooked", "max_output_tokens": 20}
    for _ in range(20):
        response = send(gateway.url, key, request)
        if response.status_code != 200:
            break
        wait_settled(gateway.url, key)
    assert_error(response, 429, "budget_exceeded", type="insufficient_quota", param="key.budget")
    poll(lambda: len(webhook.bodies) >= 2, timeout=30, what="soft and hard alerts delivered")
    assert sorted(body["kind"] for body in webhook.bodies) == ["hard", "soft"]
    for body in webhook.bodies:
        assert body["type"] == "budget.alert"
        assert (body["scope"], body["scope_id"], body["api_key_prefix"]) == ("key", api_key.id, api_key.prefix)
        assert (body["metric"], body["limit_tokens"], body["tenant"]) == ("tokens", 120, "owner")
    alerts = BudgetAlert.objects.filter(scope="key", scope_id=api_key.id)
    poll(lambda: all(alert.delivered_at is not None for alert in alerts.all()), what="alerts marked delivered")
    # Further refusals in the window record and send nothing more.
    refused = send(gateway.url, key, request)
    assert refused.status_code == 429
    live_gw.wait_usage(refused.headers["x-request-id"])
    assert alerts.count() == 2
    assert len(webhook.bodies) == 2


def test_failed_requests_are_refunded(live_gw: Live) -> None:
    request = {"model": MODEL, "input": "fails", "max_output_tokens": 200}
    estimate = reservation(request)
    # Room for one reservation, not two: a failure that kept its reservation would block the next.
    _, key = new_key(live_gw, budget_tokens=estimate + estimate // 2, concurrency=1, rpm=100)
    failed = send(live_gw.url, key, {**request, "metadata": {"fake_status": "500"}})
    assert_error(failed, 502, "upstream_error", type="server_error")
    assert_rate_headers(failed)  # on an upstream failure too
    rejected = send(live_gw.url, key, {**request, "metadata": {"fake_status": "400"}})
    assert rejected.status_code == 400  # the upstream's own refusal, relayed
    assert_rate_headers(rejected)
    wait_settled(live_gw, key)
    assert budget_spent(live_gw.url, key) == 0
    # The whole budget is still there: the next request fits.
    served = send(live_gw.url, key, {**request, "metadata": {}})
    assert served.status_code == 200, served.text
    wait_settled(live_gw, key)
    assert budget_spent(live_gw.url, key) == served.json()["usage"]["total_tokens"]
    for response in (failed, rejected):
        record = live_gw.wait_usage(response.headers["x-request-id"])
        assert (record.total_tokens, record.cost) == (None, None)


# --- operator changes ---------------------------------------------------------------------------------


def test_operator_changes_apply_on_the_next_request(live_gw: Live) -> None:
    tenant = new_tenant("ops")
    api_key, key = new_key(live_gw, tenant=tenant)
    think = {"model": MODEL, "input": "think", "reasoning": {"effort": "high"}}

    def request() -> httpx.Response:
        response = send(live_gw.url, key, think)
        # Embedded mode: let the gateway's usage write finish first. On SQLite an update
        # command's read-then-write transaction fails at once ("database is locked")
        # instead of waiting while another process writes (deferred transactions).
        live_gw.wait_usage(response.headers["x-request-id"])
        return response

    assert request().status_code == 200

    call_command("apikey_update", api_key.prefix, "--reasoning-efforts", "low")
    assert_error(request(), 403, "reasoning_effort_not_allowed", param="reasoning.effort")
    call_command("apikey_update", api_key.prefix, "--reasoning-efforts", "none")
    assert request().status_code == 200

    call_command("apikey_update", api_key.prefix, "--allowed-ips", "10.0.0.0/8")
    assert_error(request(), 403, "ip_not_allowed", type="permission_error")
    call_command("apikey_update", api_key.prefix, "--allowed-ips", "none")
    assert request().status_code == 200

    call_command("apikey_update", api_key.prefix, "--budget-tokens", "10")
    assert_error(request(), 429, "budget_exceeded", type="insufficient_quota", param="key.budget")
    call_command("apikey_update", api_key.prefix, "--budget-tokens", "none")
    assert request().status_code == 200

    minute_room(15)
    call_command("tenant_update", tenant.slug, "--rpm", "1")
    assert request().status_code == 200
    assert_error(request(), 429, "rate_limit_exceeded", type="rate_limit_error", param="tenant.rpm")
    call_command("tenant_update", tenant.slug, "--rpm", "none")
    served = request()
    assert served.status_code == 200
    assert "x-ratelimit-limit-requests" not in served.headers


# --- GET /v1/usage --------------------------------------------------------------------------------------


def test_usage_endpoint_reports_own_usage_and_limits(live_gw: Live) -> None:
    tenant = new_tenant("metered", rpm=50, budget_tokens=100_000)
    api_key, key = new_key(
        live_gw, tenant=tenant, rpm=10, tpm=50_000, concurrency=4, budget_tokens=20_000, budget_period="day"
    )
    _, sibling = new_key(live_gw, tenant=tenant)
    minute_room(20)
    mine = [
        send(live_gw.url, key, {"model": MODEL, "input": "mine", "max_output_tokens": 100}),
        send(live_gw.url, key, {"model": MODEL, "input": "mine too", "stream": True, "max_output_tokens": 100}),
    ]
    assert [r.status_code for r in mine] == [200, 200]
    # Usage of others: a sibling key of the same tenant and the outsider.
    assert send(live_gw.url, sibling, {"model": MODEL, "input": "sibling"}).status_code == 200
    outsider = live_gw.post(
        {"model": MODEL, "input": "outsider", "metadata": {"fake_tokens": "99"}}, key=live_gw.outsider.key
    )
    assert outsider.status_code == 200
    for response in mine:
        live_gw.wait_usage(response.headers["x-request-id"])
    own = records_of(api_key)
    own_tokens = sum(r.total_tokens for r in own)
    wait_settled(live_gw, key)

    report = usage_of(live_gw.url, key)
    assert report["object"] == "usage"
    assert report["key"] == {"prefix": api_key.prefix, "tenant": "metered"}
    assert report["total"]["requests"] == 2
    assert report["total"]["total_tokens"] == own_tokens
    assert report["total"]["output_tokens"] == sum(r.output_tokens for r in own)
    assert report["period"]["requests"] == 2
    key_scope = scope_report(report, "key")
    assert key_scope["requests_per_minute"]["limit"] == 10
    assert key_scope["requests_per_minute"]["remaining"] == 10 - 2 - USAGE_CALLS[key]  # this call included
    assert key_scope["tokens_per_minute"] == {
        "limit": 50_000,
        "remaining": 50_000 - own_tokens,
        "resets_at": key_scope["requests_per_minute"]["resets_at"],
    }
    assert key_scope["concurrent_requests"] == {"limit": 4, "in_use": 0, "remaining": 4}
    assert key_scope["budget"]["tokens"] == {"limit": 20_000, "spent": own_tokens, "remaining": 20_000 - own_tokens}
    # Reset times: the next minute for rates, the end of the UTC day for a daily budget.
    now = time.time()
    rate_reset = _epoch(key_scope["requests_per_minute"]["resets_at"])
    assert now < rate_reset <= now + 60
    assert rate_reset % 60 == 0
    budget_reset = _epoch(key_scope["budget"]["resets_at"])
    assert now < budget_reset <= now + 86400
    assert budget_reset % 86400 == 0
    tenant_scope = scope_report(report, "tenant")
    assert tenant_scope["requests_per_minute"]["limit"] == 50
    # The sibling's request counts here, and so does each usage call of the key.
    assert tenant_scope["requests_per_minute"]["remaining"] == 50 - 3 - USAGE_CALLS[key]
    sibling_tokens = poll(lambda: tokens_of_tenant(tenant) - own_tokens, what="sibling usage recorded")
    poll(
        lambda: budget_spent(live_gw.url, key, scope="tenant") == own_tokens + sibling_tokens,
        what="tenant budget settled",
    )
    # Each key sees its own records only: not its sibling's, not the outsider's, not the upstream's.
    live_gw.wait_usage(outsider.headers["x-request-id"])
    outsider_report = usage_of(live_gw.url, live_gw.outsider.key)
    assert outsider_report["total"]["requests"] == 1
    assert outsider_report["total"]["total_tokens"] == outsider.json()["usage"]["total_tokens"]
    assert outsider_report["limits"] == []
    assert usage_of(live_gw.url, key)["total"] == report["total"]
    assert report["total"]["total_tokens"] < live_gw.upstream.stats()["total_tokens"]


def test_usage_endpoint_counts_against_the_key_rpm(live_gw: Live) -> None:
    """Polling /v1/usage costs two aggregate queries a call: it is rate limited like any request."""
    _, key = new_key(live_gw, rpm=2)
    minute_room(15)
    calls = [httpx.get(live_gw.url + "/v1/usage", headers={"authorization": f"Bearer {key}"}) for _ in range(3)]
    assert [r.status_code for r in calls[:2]] == [200, 200], calls[0].text
    assert calls[1].headers["x-ratelimit-remaining-requests"] == "0"
    error = assert_error(calls[2], 429, "rate_limit_exceeded", type="rate_limit_error", param="key.rpm")
    assert "key.rpm" in error["message"]
    assert_retry_after(calls[2], 60)
    # The same budget of requests as /v1/responses.
    assert_error(
        send(live_gw.url, key, {"model": MODEL, "input": "hi"}),
        429,
        "rate_limit_exceeded",
        type="rate_limit_error",
        param="key.rpm",
    )


def test_usage_endpoint_serves_its_figures_from_a_short_cache(live_gw: Live) -> None:
    _, key = new_key(live_gw)
    assert usage_of(live_gw.url, key)["total"]["requests"] == 0
    response = send(live_gw.url, key, {"model": MODEL, "input": "hi"})
    assert response.status_code == 200
    live_gw.wait_usage(response.headers["x-request-id"])
    # Recorded, and still not shown: the figures are the cached ones (USAGE_CACHE_SECONDS, 5 s)...
    assert usage_of(live_gw.url, key)["total"]["requests"] == 0
    # ...until the cache entry expires.
    poll(lambda: usage_of(live_gw.url, key)["total"]["requests"] == 1, interval=0.5, what="fresh figures")


def test_usage_endpoint_after_a_restart_reports_the_budget_spent(
    live_gw: Live, start_gateway: Callable[..., live.LiveProcess]
) -> None:
    api_key, key = new_key(live_gw, budget_tokens=5000)
    first = start_gateway()
    for i in range(3):
        assert send(first.url, key, {"model": MODEL, "input": f"before restart {i}"}).status_code == 200
    assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    poll(lambda: len(records_of(api_key)) == 3, what="usage written")  # with Redis, by the other replica
    spent = sum(record.total_tokens for record in records_of(api_key))
    assert spent > 0
    # A fresh process has no counter for this key (embedded mode), nor has Redis after a restart.
    forget_counters(("key", api_key.id))
    second = start_gateway()
    report = scope_report(usage_of(second.url, key), "key")["budget"]["tokens"]
    assert report == {"limit": 5000, "spent": spent, "remaining": 5000 - spent}


# --- (b) two replicas on PostgreSQL + Redis ------------------------------------------------------------


@pytest.fixture
def second_gateway(start_gateway: Callable[..., live.LiveProcess]) -> live.LiveProcess:
    return start_gateway()


@pytest.fixture
def load_fake() -> Iterator[FakeUpstream]:
    """A fake upstream of its own: its stats count only the load of one test."""
    port = live.free_port()
    with live.running(live.fake_upstream(port, live.child_env(), DATA_DIR / f"fake-load-{port}.log")):
        upstream = FakeUpstream(f"http://127.0.0.1:{port}/v1")
        yield upstream
        upstream.control.close()


LOAD_MODEL = "gpt-load"


@needs_replicas
def test_rpm_is_exact_across_replicas(live_gw: Live, second_gateway: live.LiveProcess) -> None:
    _, key = new_key(live_gw, rpm=40)
    urls = [live_gw.url, second_gateway.url]
    # Warm both replicas first (the key read, the config snapshot, the upstream connections): the
    # second replica just started, and a cold one would lose the whole race to the warm one.
    for url in urls:
        headers = {"authorization": f"Bearer {key}"}
        assert httpx.get(url + "/v1/models", headers=headers, timeout=30).status_code == 200
        assert send(url, live_gw.owner.key, {"model": MODEL, "input": "warm"}).status_code == 200
    minute_room(25)
    calls = [functools.partial(send, urls[i % 2], key, {"model": MODEL, "input": f"burst {i}"}) for i in range(100)]
    responses = parallel(calls, workers=50)
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    print(
        f"\n[rpm across replicas] sent 100 (50 per replica, 50 at once), limit 40: "
        f"{len(ok)} served ({sum(1 for i, r in enumerate(responses) if r.status_code == 200 and i % 2 == 0)} by A, "
        f"{sum(1 for i, r in enumerate(responses) if r.status_code == 200 and i % 2 == 1)} by B), "
        f"{len(refused)} refused"
    )
    assert len(ok) == 40
    assert len(refused) == 60
    for response in refused:
        assert_error(response, 429, "rate_limit_exceeded", type="rate_limit_error", param="key.rpm")
    # 50 went to each replica and 40 were served in all: separate counters would have served 80.
    # Which replica wins the race is up to the scheduler, so only the refusals are checked per
    # replica (each got 50, at most 40 of them could pass on either).
    assert {i % 2 for i, r in enumerate(responses) if r.status_code == 429} == {0, 1}
    assert all(0 <= int(r.headers["x-ratelimit-remaining-requests"]) < 40 for r in ok)
    assert all(r.headers["x-ratelimit-remaining-requests"] == "0" for r in refused)


@needs_replicas
def test_budget_holds_under_concurrency_across_replicas(
    live_gw: Live, second_gateway: live.LiveProcess, load_fake: FakeUpstream
) -> None:
    from accounts import services as account_services

    account = live_gw.add_account([LOAD_MODEL], base_url=load_fake.base_url, pool="load")
    # Forward max_output_tokens: the upstream then uses (nearly) all of each reservation.
    account_services.pool_set_strip_fields(pool=account.pool, fields=[])
    request = {
        "model": LOAD_MODEL,
        "input": "spend the budget",
        "max_output_tokens": 100,
        "metadata": {"fake_tokens": "400", "fake_latency_ms": "200"},
    }
    one = reservation(request)
    budget = 10 * one + one // 2
    api_key, key = new_key(live_gw, budget_tokens=budget)
    urls = [live_gw.url, second_gateway.url]
    responses = parallel([functools.partial(send, urls[i % 2], key, request) for i in range(50)], workers=50)
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    for response in refused:
        assert_error(response, 429, "budget_exceeded", type="insufficient_quota", param="key.budget")
    assert len(ok) + len(refused) == 50
    reported = sum(r.json()["usage"]["total_tokens"] for r in ok)
    poll(lambda: len(records_of(api_key)) == 50, timeout=30, what="50 usage records")
    spent = tokens_in_db(api_key)["total_tokens"]
    print(
        f"\n[budget across replicas] 50 concurrent requests (25 per replica), budget {budget} tokens, "
        f"reservation {one} tokens/request: {len(ok)} served, {len(refused)} refused; "
        f"spent {spent} tokens in the database (upstream reported {reported}; "
        f"budget - spent = {budget - spent})"
    )
    assert spent == reported
    assert spent <= budget + one
    assert ok
    assert refused
    # Each served request used nearly its reservation: the budget was not merely left unused.
    assert all(r.json()["usage"]["total_tokens"] > one - 20 for r in ok)


class Load:
    """Requests sent on worker threads, alternating between gateways, until told to stop."""

    def __init__(self, urls: list[str], key: str, total: int, workers: int) -> None:
        self.urls = urls
        self.key = key
        self.total = total
        self.workers = workers
        self.results: list[tuple[int, int | str, str, dict[str, Any] | None]] = []  # (url index, status, rid, usage)
        self._lock = threading.Lock()
        self._next = 0
        self.done = threading.Event()

    def body(self, i: int) -> dict[str, Any]:
        request: dict[str, Any] = {"model": LOAD_MODEL, "input": f"load {i} " + "x" * (i % 17)}
        if i % 3 == 1:
            request["stream"] = True
        if i % 5 == 2:
            request["prompt_cache_key"] = f"pk-{i % 4}"
        if i % 7 == 3:
            request["reasoning"] = {"effort": "low"}
        return request

    def _work(self) -> None:
        while True:
            with self._lock:
                i = self._next
                if i >= self.total:
                    return
                self._next += 1
            target = i % len(self.urls)
            status: int | str
            rid = ""
            usage = None
            try:
                response = send(self.urls[target], self.key, self.body(i))
                status = response.status_code
                rid = response.headers.get("x-request-id", "")
                if status == 200:
                    if response.headers["content-type"].startswith("text/event-stream"):
                        usage = live.sse_events(response.content)[-1]["response"]["usage"]
                    else:
                        usage = response.json()["usage"]
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            with self._lock:
                self.results.append((target, status, rid, usage))

    def run(self) -> threading.Thread:
        def main() -> None:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                for _ in range(self.workers):
                    pool.submit(self._work)
            self.done.set()

        thread = threading.Thread(target=main, daemon=True)
        thread.start()
        return thread

    def answered(self) -> int:
        with self._lock:
            return len(self.results)


def _load_setup(gw: Live, fake: FakeUpstream) -> tuple[Any, str]:
    gw.add_account([LOAD_MODEL], base_url=fake.base_url, pool="load")
    fake.reset()
    return new_key(gw)


def _await_usage(api_key: Any, fake: FakeUpstream, request_ids: list[str], timeout: float = 90) -> dict[str, int]:
    """Poll until every request id has its record and the token sums equal the fake's."""
    from django.db import close_old_connections

    from tenancy.models import UsageRecord

    stats = fake.stats()
    expected = {name: stats[name] for name in TOKEN_COLUMNS}

    def arrived() -> bool:
        close_old_connections()
        if UsageRecord.objects.filter(request_id__in=request_ids).count() != len(request_ids):
            return False
        return tokens_in_db(api_key) == expected

    poll(arrived, timeout=timeout, interval=0.2, what="usage records in the database")
    return expected


def _pg_restart() -> None:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )


@needs_replicas
def test_usage_totals_exact_after_a_database_restart(
    live_gw: Live, second_gateway: live.LiveProcess, load_fake: FakeUpstream
) -> None:
    from django.db import connection

    api_key, key = _load_setup(live_gw, load_fake)
    load = Load([live_gw.url, second_gateway.url], key, total=400, workers=8)
    thread = load.run()
    poll(lambda: load.answered() >= 100, timeout=60, what="load under way")
    at_restart = load.answered()
    _pg_restart()
    after_restart = load.answered()
    thread.join(120)
    assert load.done.is_set()
    connection.close()  # the test's own connection died with the server
    statuses = [status for _, status, _, _ in load.results]
    ok = [rid for _, status, rid, _ in load.results if status == 200]
    failed = [status for status in statuses if status != 200]
    request_ids = [rid for _, _, rid, _ in load.results if rid]
    expected = _await_usage(api_key, load_fake, request_ids)
    in_db = tokens_in_db(api_key)
    print(
        f"\n[PostgreSQL restart mid-load] sent {len(statuses)} requests over 2 replicas "
        f"(restart after {at_restart} answered, back after {after_restart}); succeeded {len(ok)}, "
        f"failed {len(failed)} {sorted(set(map(str, failed)))}; tokens reported by the fake {expected}; "
        f"in the database {in_db}; records {len(request_ids)}"
    )
    assert len(statuses) == 400
    # The data plane does not touch the database per request: nothing fails.
    assert failed == []
    assert in_db == expected
    for name in ("total_tokens", "cached_tokens", "cache_write_tokens", "reasoning_tokens"):
        assert expected[name] > 0, name  # the load exercised every counter
    # Answers as the clients saw them agree too.
    client_total = sum(usage["total_tokens"] for _, _, _, usage in load.results if usage)
    assert client_total == in_db["total_tokens"]
    # After the restart, both replicas still read the database when they must: a changed
    # key (the configuration snapshot) and a new budget (its seed) apply on the next request.
    call_command("apikey_update", api_key.prefix, "--allowed-ips", "10.0.0.0/8")
    _, budgeted = new_key(live_gw, budget_tokens=10)
    for url in (live_gw.url, second_gateway.url):
        assert_error(
            send(url, key, {"model": LOAD_MODEL, "input": "x"}), 403, "ip_not_allowed", type="permission_error"
        )
        assert_error(
            send(url, budgeted, {"model": LOAD_MODEL, "input": "x"}),
            429,
            "budget_exceeded",
            type="insufficient_quota",
            param="key.budget",
        )


@needs_replicas
def test_usage_totals_exact_after_sigterm_of_one_replica(
    live_gw: Live, second_gateway: live.LiveProcess, load_fake: FakeUpstream
) -> None:
    api_key, key = _load_setup(live_gw, load_fake)
    load = Load([live_gw.url, second_gateway.url], key, total=400, workers=8)
    thread = load.run()
    poll(lambda: load.answered() >= 120, timeout=60, what="load under way")
    at_stop = load.answered()
    code = second_gateway.stop(signal.SIGTERM)
    thread.join(120)
    assert load.done.is_set()
    by_b = [(status, rid) for target, status, rid, _ in load.results if target == 1]
    answered_b = [rid for status, rid in by_b if isinstance(status, int)]
    refused_b = [status for status, _ in by_b if not isinstance(status, int)]
    answered = [rid for _, status, rid, _ in load.results if isinstance(status, int)]
    expected = _await_usage(api_key, load_fake, answered)
    in_db = tokens_in_db(api_key)
    print(
        f"\n[SIGTERM of replica B mid-load] sent {len(load.results)} requests (B stopped after {at_stop} answered, "
        f"exit code {code}); B answered {len(answered_b)} (all recorded), then failed {len(refused_b)} "
        f"{sorted(set(map(str, refused_b)))}; A answered {len(answered) - len(answered_b)}; succeeded "
        f"{sum(1 for _, s, _, _ in load.results if s == 200)}; tokens reported by the fake {expected}; "
        f"in the database {in_db}"
    )
    assert code in (0, -signal.SIGTERM)
    assert all(status == 200 for _, status, _, _ in load.results if isinstance(status, int))
    assert answered_b
    assert refused_b
    assert in_db == expected
    client_total = sum(usage["total_tokens"] for _, _, _, usage in load.results if usage)
    assert client_total == in_db["total_tokens"]
