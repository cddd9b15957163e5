"""Usage metering through a live gateway: one record per request, token for token what the
upstream reported, unknown kept unknown, nothing lost at shutdown; and the Daphne server."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from django.conf import settings

from tests import harness as live
from tests.conftest import MODEL, Live
from tests.harness import assert_error, sse_events

pytestmark = pytest.mark.live

TOKEN_FIELDS = ("input_tokens", "cached_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens")


def reported_usage(response: httpx.Response) -> tuple[str, dict[str, Any] | None]:
    """(response id, usage) as the client saw them, from a JSON answer or a stream's terminal event."""
    if response.headers["content-type"].startswith("text/event-stream"):
        final = sse_events(response.content)[-1]["response"]
    else:
        final = response.json()
    return final["id"], final["usage"]


def usage_columns(usage: dict[str, Any]) -> dict[str, int]:
    return {
        "input_tokens": usage["input_tokens"],
        "cached_tokens": usage["input_tokens_details"]["cached_tokens"],
        "cache_write_tokens": usage["input_tokens_details"]["cache_write_tokens"],
        "output_tokens": usage["output_tokens"],
        "reasoning_tokens": usage["output_tokens_details"]["reasoning_tokens"],
        "total_tokens": usage["total_tokens"],
    }


def test_one_record_per_request_token_for_token(live_gw: Live) -> None:
    from tenancy.models import UsageRecord

    live_gw.upstream.reset()
    requests: list[dict[str, Any]] = [
        {"model": MODEL, "input": "plain"},
        {"model": MODEL, "input": "cached prompt", "prompt_cache_key": "pk-1", "stream": True},
        {"model": MODEL, "input": "cached prompt", "prompt_cache_key": "pk-1"},
        {"model": MODEL, "input": "think", "reasoning": {"effort": "low", "summary": "auto"}, "stream": True},
        {"model": MODEL, "input": "think more", "reasoning": {"effort": "medium"}, "metadata": {"fake_tokens": "3"}},
    ]
    totals = dict.fromkeys((*TOKEN_FIELDS, "total_tokens"), 0)
    for request in requests:
        response = live_gw.post(request)
        assert response.status_code == 200, response.text
        response_id, usage = reported_usage(response)
        assert usage is not None
        record = live_gw.wait_usage(response.headers["x-request-id"])
        expected = usage_columns(usage)
        assert {name: getattr(record, name) for name in expected} == expected
        for name, value in expected.items():
            totals[name] += value
        assert record.tenant_id == live_gw.owner.tenant.id
        assert record.api_key_id == live_gw.owner.api_key.id
        assert record.account_id == live_gw.account.id
        assert (record.model, record.status_code, record.outcome) == (MODEL, 200, "completed")
        assert record.stream is bool(request.get("stream"))
        assert record.response_id == response_id
        assert record.ttfb_ms is not None
        assert 0 < record.ttfb_ms <= record.latency_ms
    # The cases above really exercise every counter.
    assert totals["cached_tokens"] > 0
    assert totals["cache_write_tokens"] > 0
    assert totals["reasoning_tokens"] > 0
    stats = live_gw.upstream.stats()
    assert {name: stats[name] for name in totals} == totals
    assert UsageRecord.objects.filter(api_key=live_gw.owner.api_key).count() == len(requests)


def test_incomplete_response_is_metered_as_incomplete(live_gw: Live) -> None:
    from accounts import services as account_services

    account_services.pool_set_strip_fields(pool=live_gw.account.pool, fields=[])  # let max_output_tokens through
    for stream in (False, True):
        request = {"model": MODEL, "input": "long", "max_output_tokens": 16, "metadata": {"fake_tokens": "40"}}
        response = live_gw.post({**request, "stream": stream})
        _, usage = reported_usage(response)
        record = live_gw.wait_usage(response.headers["x-request-id"])
        assert record.outcome == "incomplete"
        assert usage is not None
        assert record.output_tokens == usage["output_tokens"] == 16


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_missing_upstream_usage_stays_null(live_gw: Live, stream: bool) -> None:
    response = live_gw.post({"model": MODEL, "input": "hi", "stream": stream, "metadata": {"fake_no_usage": "1"}})
    assert response.status_code == 200
    _, usage = reported_usage(response)
    assert usage is None
    record = live_gw.wait_usage(response.headers["x-request-id"])
    assert record.outcome == "completed"
    for name in (*TOKEN_FIELDS, "total_tokens"):
        assert getattr(record, name) is None, name


def test_rejected_requests_are_recorded_without_tokens(live_gw: Live) -> None:
    from tenancy.models import UsageRecord

    _, restricted = live_gw.new_key(allowed_models=["gpt-other"])
    unauthenticated = live_gw.post({"model": MODEL, "input": "hi"}, key="sk-gw-unknown-unknown-unknown")
    cases = [
        (live_gw.post({"model": MODEL, "input": "hi", "store": True}), 400, MODEL),
        (live_gw.post({"model": MODEL, "input": 5}), 400, MODEL),
        (live_gw.post({"model": MODEL, "input": "hi"}, key=restricted), 403, MODEL),
        (live_gw.post({"model": "gpt-nobody", "input": "hi"}), 404, "gpt-nobody"),
        (live_gw.post({"model": MODEL, "input": "hi", "conversation": "conv_1"}), 501, MODEL),
    ]
    for response, status, model in cases:
        assert response.status_code == status
        record = live_gw.wait_usage(response.headers["x-request-id"])
        assert (record.outcome, record.status_code, record.model) == ("rejected", status, model)
        assert record.account_id is None
        assert record.response_id == ""
        for name in (*TOKEN_FIELDS, "total_tokens"):
            assert getattr(record, name) is None, name
    # Records leave in order: the later ones are written, so an unauthenticated one would be too.
    assert_error(unauthenticated, 401, "invalid_api_key")
    assert not UsageRecord.objects.filter(request_id=unauthenticated.headers["x-request-id"]).exists()


def _post(url: str, key: str, payload: dict[str, Any]) -> httpx.Response:
    response = httpx.post(url + "/v1/responses", json=payload, headers={"authorization": f"Bearer {key}"}, timeout=20)
    assert response.status_code == 200, response.text
    return response


def test_usage_survives_a_gateway_shutdown(live_gw: Live, start_gateway: Callable[..., live.LiveProcess]) -> None:
    from tenancy.models import UsageRecord

    # With Redis, a flush interval far beyond the test: only the shutdown path can XADD these
    # records. (Embedded, each is in the journal when its request ends; the journal's shutdown
    # path has its own tests in test_live_usage_writer.py.)
    gateway = start_gateway(GATEWAY_USAGE_FLUSH_SECONDS="60")
    request_ids = [
        _post(gateway.url, live_gw.owner.key, {"model": MODEL, "input": f"n{i}", "stream": i % 2 == 1}).headers[
            "x-request-id"
        ]
        for i in range(12)
    ]
    if settings.REDIS_URL:
        assert not UsageRecord.objects.filter(request_id__in=request_ids).exists(), "written before shutdown?"
    # uvicorn re-raises the SIGTERM after its graceful shutdown; a SIGKILL (-9) would mean it hung.
    assert gateway.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    # Embedded: written at shutdown. Redis: pushed to the usage stream at shutdown and
    # written by the drainer of another replica (the session's gateway), so poll.
    written = UsageRecord.objects.filter(request_id__in=request_ids)
    live.poll(lambda: written.count() == len(request_ids), timeout=15)
    assert sorted(written.values_list("request_id", flat=True)) == sorted(request_ids)
    assert all(record.output_tokens == 16 for record in written)


def test_daphne_serves_create_and_stream(live_gw: Live, start_gateway: Callable[..., live.LiveProcess]) -> None:
    from tenancy.models import UsageRecord

    gateway = start_gateway(server="daphne", GATEWAY_USAGE_FLUSH_SECONDS="60")
    created = _post(gateway.url, live_gw.owner.key, {"model": MODEL, "input": "hi"})
    assert created.json()["status"] == "completed"
    assert created.headers["x-request-id"].startswith("req_")
    streamed = _post(gateway.url, live_gw.owner.key, {"model": MODEL, "input": "hi", "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.content)
    assert events[-1]["type"] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    rejected = httpx.post(
        gateway.url + "/v1/responses",
        json={"model": MODEL, "input": "hi", "store": True},
        headers={"authorization": f"Bearer {live_gw.owner.key}"},
    )
    assert_error(rejected, 400, "invalid_request_error", param="store")
    # Daphne sends no lifespan events: the runtime closes at the reactor's shutdown.
    request_ids = [r.headers["x-request-id"] for r in (created, streamed, rejected)]
    assert gateway.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    records = UsageRecord.objects.filter(request_id__in=request_ids)
    live.poll(lambda: records.count() == len(request_ids), timeout=15)  # Redis: via another replica's drainer
    outcomes = dict(records.values_list("request_id", "outcome"))
    assert outcomes == dict(zip(request_ids, ["completed", "completed", "rejected"], strict=True))
