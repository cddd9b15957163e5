"""``GET /metrics`` of a live gateway with two worker processes, after a known mix of requests.

Every counter and histogram sum is checked against what was sent and what the usage writer
metered (the usage records in the database): successes, a stream, a refusal by a key's rpm,
failovers from a failing account, an invalid request and a bad key. The gateway runs
``serve --workers 2``, so the answer must add up both workers (prometheus-client's
multiprocess mode). Also: the endpoint's protection (loopback or a bearer token), and
``/readyz`` reporting the usage backlog.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from accounts import services as account_services
from accounts.models import Pool
from tests import harness as live
from tests.conftest import MODEL, Live
from tests.harness import KnobbedFake, poll
from tests.live.test_live_limits import new_key, new_tenant
from tests.live.test_live_pools import _forget_shared_health

pytestmark = pytest.mark.live

FAILOVER_MODEL = "fo-model"
TOKEN_FIELDS = {
    "input": "input_tokens",
    "cached_input": "cached_tokens",
    "cache_write": "cache_write_tokens",
    "output": "output_tokens",
    "reasoning": "reasoning_tokens",
}


def scrape(url: str, **headers: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] of one ``GET /metrics``."""
    response = httpx.get(url + "/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    samples: dict[str, list[tuple[dict[str, str], float]]] = collections.defaultdict(list)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str) -> float:
    return sum(value for labels, value in samples.get(name, []) if all(labels.get(k) == v for k, v in match.items()))


def _setup(live_gw: Live, failing: KnobbedFake) -> str:
    """Prices, a failover pool (the failing account first) and a key limited to 1 rpm."""
    from tenancy.services.prices import price_set

    for model in (MODEL, FAILOVER_MODEL):
        price_set(model=model, input="2", cached_input="1", cache_write="2.5", output="8")
    first = live_gw.add_account([FAILOVER_MODEL], base_url=failing.base_url, pool="fo", priority=0)
    second = live_gw.add_account([FAILOVER_MODEL], pool="fo", priority=1)
    _forget_shared_health([first.pk, second.pk])
    account_services.pool_set_strategy(pool=Pool.objects.get(name="fo"), strategy="fill_first")
    return new_key(live_gw, rpm=1)[1]


def test_metrics_add_up_to_what_was_sent_and_metered_across_two_workers(
    live_gw: Live, failing: KnobbedFake, start_gateway: Callable[..., live.LiveProcess]
) -> None:
    limited = _setup(live_gw, failing)
    # Everything exists before the gateway starts: each worker's first snapshot has it all.
    gateway = start_gateway(args=("--workers", "2"), GATEWAY_METRICS_SAMPLE_SECONDS="0.2")
    sent: list[httpx.Response] = []
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        owner = {"authorization": f"Bearer {live_gw.owner.key}"}

        def post(payload: dict[str, Any], headers: dict[str, str] = owner) -> httpx.Response:
            response = client.post("/v1/responses", json=payload, headers=headers)
            sent.append(response)
            return response

        for _ in range(3):
            assert post({"model": MODEL, "input": "hello there"}).status_code == 200
        with client.stream(
            "POST", "/v1/responses", json={"model": MODEL, "input": "a stream", "stream": True}, headers=owner
        ) as stream:
            assert stream.status_code == 200
            stream.read()
            sent.append(stream)
        for _ in range(2):
            assert post({"model": FAILOVER_MODEL, "input": "fail over"}).status_code == 200
        limited_headers = {"authorization": f"Bearer {limited}"}
        assert post({"model": MODEL, "input": "first"}, limited_headers).status_code == 200
        assert post({"model": MODEL, "input": "second"}, limited_headers).status_code == 429
        assert post({"model": MODEL, "input": "x", "temperature": "hot"}).status_code == 400
        bad = client.post(
            "/v1/responses", json={"model": MODEL, "input": "x"}, headers={"authorization": "Bearer nope"}
        )
        assert bad.status_code == 401
    assert failing.received >= 1  # the failing account was tried: there were failovers

    records = [live_gw.wait_usage(response.headers["x-request-id"]) for response in sent]

    def counted() -> dict[str, list[tuple[dict[str, str], float]]] | None:
        # A worker adds its tallies to the shared values at most a second after a request
        # (gateway/observability/metrics.py FLUSH_SECONDS); the one scraped adds its own at once.
        current = scrape(gateway.url)
        return current if total(current, "gateway_requests_total") == len(records) + 1 else None

    samples = poll(counted, what="every request counted by both workers")
    assert samples is not None

    # Requests by status (route responses): the records, plus the bad key (not metered).
    statuses = collections.Counter(str(record.status_code) for record in records)
    statuses["401"] += 1
    for status, count in statuses.items():
        assert total(samples, "gateway_requests_total", route="responses", status=status) == count, status
    assert total(samples, "gateway_requests_total") == len(records) + 1
    assert total(samples, "gateway_requests_total", status="429", error_code="rate_limit_exceeded") == 1
    assert total(samples, "gateway_requests_total", status="400", error_code="") == 0  # the code is counted
    assert total(samples, "gateway_requests_total", status="401", error_code="invalid_api_key") == 1
    assert total(samples, "gateway_refusals_total", scope="key", limit="rpm") == 1

    # Upstream attempts by account and outcome, and failovers: the records' attempts.
    attempts: collections.Counter[tuple[str, str]] = collections.Counter()
    failovers = 0
    for record in records:
        made = len(record.attempts)
        for attempt in record.attempts:
            attempts[(str(attempt["account_id"]), attempt["outcome"])] += 1
        if record.account_id is not None and record.status_code == 200:
            attempts[(str(record.account_id), "success")] += 1
            made += 1
        failovers += max(made - 1, 0)
    assert failovers >= 1
    seen = {
        (labels["account"], labels["outcome"]): value for labels, value in samples["gateway_upstream_attempts_total"]
    }
    assert seen == attempts
    assert total(samples, "gateway_failovers_total") == failovers

    # Token usage by type: every usage an upstream reported, failed attempts' too.
    for kind, field in TOKEN_FIELDS.items():
        values = [getattr(record, field) for record in records] + [
            attempt.get(field) for record in records for attempt in record.attempts
        ]
        # input and output are observed always; our three types only when not 0.
        reported = [value for value in values if value is not None and (value or kind in ("input", "output"))]
        assert total(samples, "gen_ai_client_token_usage_sum", gen_ai_token_type=kind) == sum(reported), kind
        assert total(samples, "gen_ai_client_token_usage_count", gen_ai_token_type=kind) == len(reported), kind
    assert sum(record.output_tokens or 0 for record in records) > 0

    # Cost, latency and time to first byte: exactly what the records say.
    cost = sum((record.cost for record in records if record.cost is not None), Decimal(0))
    assert cost > 0
    assert math.isclose(total(samples, "gateway_cost_usd_total"), float(cost), rel_tol=1e-9)
    latency = sum(record.latency_ms for record in records) / 1000
    assert total(samples, "gen_ai_server_request_duration_seconds_count") == len(records) + 1
    assert total(samples, "gen_ai_server_request_duration_seconds_sum") >= latency
    metered = total(samples, "gen_ai_server_request_duration_seconds_sum", error_type="invalid_api_key")
    assert math.isclose(total(samples, "gen_ai_server_request_duration_seconds_sum") - metered, latency, rel_tol=1e-9)
    first_bytes = [record.ttfb_ms / 1000 for record in records if record.ttfb_ms is not None and record.stream]
    assert total(samples, "gen_ai_server_time_to_first_token_seconds_count") == len(first_bytes)
    assert math.isclose(total(samples, "gen_ai_server_time_to_first_token_seconds_sum"), sum(first_bytes), rel_tol=1e-9)
    assert total(samples, "gen_ai_server_time_per_output_token_seconds_count") == 1  # the stream
    tried = sum(attempts.values())
    assert total(samples, "gen_ai_client_operation_duration_seconds_count") == tried

    # The sampled gauges (both workers): writers up, nothing waiting, the accounts' health.
    def sampled() -> dict[str, list[tuple[dict[str, str], float]]] | None:
        current = scrape(gateway.url)
        return current if current.get("gateway_account_health") and current.get("gateway_usage_writer_up") else None

    gauges = poll(sampled, what="sampled gauges")
    assert gauges is not None
    assert total(gauges, "gateway_usage_writer_up") == 1
    assert total(gauges, "gateway_account_health", account=str(live_gw.account.pk), state="healthy") == 1
    assert total(gauges, "gateway_config_snapshot_version") > 0
    assert "gateway_usage_backlog_records" in gauges
    # No label carries a request id or a key.
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    assert "req_" not in text
    assert live_gw.owner.key not in text
    assert limited not in text


def test_metrics_need_the_token_when_one_is_set(start_gateway: Callable[..., live.LiveProcess]) -> None:
    token = "metrics-token-0123456789"
    gateway = start_gateway(GATEWAY_METRICS_TOKEN=token)
    assert httpx.get(gateway.url + "/metrics", timeout=10).status_code == 401
    wrong = httpx.get(gateway.url + "/metrics", headers={"authorization": "Bearer wrong-token-0123456789"}, timeout=10)
    assert wrong.status_code == 401
    samples = scrape(gateway.url, authorization=f"Bearer {token}")
    assert "gateway_config_reloads_total" in samples
    readiness = httpx.get(gateway.url + "/readyz", timeout=10)
    assert readiness.status_code == 200, readiness.text
    assert readiness.json()["reasons"] == []
    assert readiness.json()["usage_backlog"] >= 0


def test_tenant_labels_and_the_remaining_budget_when_turned_on(
    live_gw: Live, start_gateway: Callable[..., live.LiveProcess]
) -> None:
    from tenancy.services.prices import price_set

    price_set(model=MODEL, input="2", cached_input="1", cache_write="2.5", output="8")
    tenant = new_tenant("budgeted", budget_usd="5")
    _, secret = new_key(live_gw, tenant=tenant)
    gateway = start_gateway(GATEWAY_METRICS_TENANT_LABELS="true", GATEWAY_METRICS_SAMPLE_SECONDS="0.2")
    response = httpx.post(
        gateway.url + "/v1/responses",
        json={"model": MODEL, "input": "spend"},
        headers={"authorization": f"Bearer {secret}"},
        timeout=30,
    )
    assert response.status_code == 200
    record = live_gw.wait_usage(response.headers["x-request-id"])
    assert record.cost is not None
    assert record.cost > 0
    who = {"tenant": str(tenant.id), "key_prefix": secret[: len(record.api_key.prefix)]}
    assert who["key_prefix"] == record.api_key.prefix

    def remaining() -> float | None:
        samples = scrape(gateway.url)
        found = [
            value
            for labels, value in samples.get("gateway_budget_remaining_usd", [])
            if labels == {"tenant": who["tenant"]}
        ]
        return found[0] if found and found[0] < 5 else None

    left = poll(remaining, what="the tenant's remaining budget")
    assert left == pytest.approx(5 - float(record.cost), abs=1e-6)
    samples = scrape(gateway.url)
    assert total(samples, "gateway_requests_total", route="responses", status="200", **who) == 1
    assert total(samples, "gateway_cost_usd_total", **who) == pytest.approx(float(record.cost), rel=1e-9)
