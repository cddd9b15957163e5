"""OpenTelemetry spans of the data plane, read with the SDK's ``InMemorySpanExporter``.

The gateway's ASGI app runs in this process (httpx's ASGI transport) against real upstreams
over loopback sockets: a failing account first, then a healthy one (a failover), so the tree
shows the request span, the admission, two attempt spans and the relay, and the upstreams
received the attempts' ``traceparent``.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar, cast

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.dataplane.app import GatewayApp
from gateway.observability import tracing
from tests.conftest import Live
from tests.harness import KnobbedFake
from tests.live.test_live_metrics import FAILOVER_MODEL, _setup

pytestmark = pytest.mark.live
T = TypeVar("T")


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    tracing.configure("", "gateway-test", exporter=memory)
    yield memory
    tracing.shutdown()


def _serve(key: str, payloads: list[dict[str, Any]], **headers: str) -> list[httpx.Response]:
    """POST each payload to a gateway app running in this process (started on the first request)."""

    async def main() -> list[httpx.Response]:
        app = GatewayApp()
        transport = httpx.ASGITransport(app=cast(Any, app), client=("127.0.0.1", 50000))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                sent = {"authorization": f"Bearer {key}", **headers}
                return [await client.post("/v1/responses", json=payload, headers=sent) for payload in payloads]
        finally:
            await app._close()

    return _run(main())


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main``; the database connections its worker threads opened are closed after."""
    try:
        return asyncio.run(main)
    finally:
        gc.collect()  # the threads are gone: their connections are closed when collected


def test_a_request_is_one_span_with_admission_attempts_and_relay(
    live_gw: Live, failing: KnobbedFake, exporter: InMemorySpanExporter, settings: Any
) -> None:
    settings.GATEWAY_USAGE_DRAINER = False  # the session gateway's writer drains the journal / stream
    _setup(live_gw, failing)
    (response,) = _serve(live_gw.owner.key, [{"model": FAILOVER_MODEL, "input": "trace me"}])
    assert response.status_code == 200, response.text

    spans = exporter.get_finished_spans()
    by_id = {span.context.span_id: span for span in spans}
    (root,) = [span for span in spans if span.parent is None]
    assert root.name == "POST /v1/responses"
    assert root.kind is SpanKind.SERVER
    attributes: dict[str, Any] = dict(root.attributes or {})
    assert attributes["http.response.status_code"] == 200
    assert attributes["gen_ai.request.model"] == FAILOVER_MODEL
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gateway.request_id"] == response.headers["x-request-id"]
    assert attributes["gen_ai.usage.output_tokens"] > 0

    children = sorted((span for span in spans if span.parent is not None), key=lambda span: span.start_time or 0)
    assert all(span.context.trace_id == root.context.trace_id for span in children)
    first_level = [span for span in children if span.parent is not None and span.parent.span_id == root.context.span_id]
    # With Redis a stale snapshot is admitted again on the new one: one admission span each time.
    names = [span.name for span in first_level]
    assert names[0] == "gateway.admission"
    attempts = [span for span in first_level if span.name != "gateway.admission"]
    assert [span.name for span in attempts] == [f"chat {FAILOVER_MODEL}"] * 2
    failed, served = attempts
    assert failed.kind is SpanKind.CLIENT
    assert failed.status.status_code is StatusCode.ERROR
    assert dict(failed.attributes or {})["http.response.status_code"] == 500
    assert dict(failed.attributes or {})["gateway.account_id"] != dict(served.attributes or {})["gateway.account_id"]
    assert dict(served.attributes or {})["gen_ai.response.model"] == FAILOVER_MODEL
    (relay,) = [span for span in children if span.name == "gateway.relay"]
    assert relay.parent is not None
    assert by_id[relay.parent.span_id] is served

    # Each attempt's context reached its upstream as traceparent; no credential of ours is in a span.
    sent = failing.requests()[-1]["headers"]["traceparent"]
    assert sent.startswith(f"00-{root.context.trace_id:032x}-{failed.context.span_id:016x}-")
    served_headers = live_gw.upstream.last_request()["headers"]
    assert served_headers["traceparent"].split("-")[2] == f"{served.context.span_id:016x}"
    everything = repr([dict(span.attributes or {}) for span in spans])
    assert live_gw.owner.key not in everything
    assert "sk-upstream-secret" not in everything
    assert "trace me" not in everything  # no prompt


def test_a_stream_has_its_relay_span_and_a_client_traceparent_is_continued(
    live_gw: Live, exporter: InMemorySpanExporter, settings: Any
) -> None:
    settings.GATEWAY_USAGE_DRAINER = False
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"

    body = {"model": "gpt-test", "input": "a stream", "stream": True}
    (response,) = _serve(live_gw.owner.key, [body], traceparent=f"00-{trace_id}-00f067aa0ba902b7-01")
    assert response.status_code == 200
    assert b"response.completed" in response.content
    spans = exporter.get_finished_spans()
    assert {f"{span.context.trace_id:032x}" for span in spans} == {trace_id}
    names = [span.name for span in spans]
    assert names.count("gateway.relay") == 1
    assert names.count("chat gpt-test") == 1
    (root,) = [span for span in spans if span.name == "POST /v1/responses"]
    assert root.parent is not None
    assert f"{root.parent.span_id:016x}" == "00f067aa0ba902b7"
