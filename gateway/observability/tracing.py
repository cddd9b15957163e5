"""OpenTelemetry traces of the data plane: off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.

One span per request (``POST /v1/responses``, kind SERVER; a ``traceparent`` the client sent
is continued), with children: ``gateway.admission``, one ``chat {model}`` span (kind CLIENT)
per upstream attempt, whose context goes to the upstream as ``traceparent``, and
``gateway.relay`` (the answer sent to the client, a stream relayed frame by frame). GenAI
attributes (semantic conventions 1.37.0: ``gen_ai.operation.name``, ``gen_ai.provider.name``,
``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.usage.*``, ``error.type``) go on
the request and attempt spans; never a prompt, a credential or a key (only its public prefix).

The spans are the current span of the request's task (contextvars), so children nest without
being passed around. While tracing is off every helper returns :data:`OFF`, a shared no-op
context manager: the cost is one global read per call.

The provider is this module's own (not the global one), so :func:`configure` may be called
again, as the tests do with the SDK's ``InMemorySpanExporter``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.observability.metrics import OPERATION, PROVIDER

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from accounts.upstream.account import AccountInfo
    from gateway.dataplane.exchange import Exchange

OFF = contextlib.nullcontext()
_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_propagator = TraceContextTextMapPropagator()


def enabled() -> bool:
    return _tracer is not None


def configure(endpoint: str, service_name: str, exporter: SpanExporter | None = None) -> None:
    """Turn tracing on: export to ``endpoint`` (OTLP over HTTP, batched), or to ``exporter``
    (synchronously, for tests). An empty endpoint and no exporter turns it off."""
    global _tracer, _provider
    shutdown()
    if not endpoint and exporter is None:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # reads the OTEL_* variables
    _provider = provider
    _tracer = provider.get_tracer("gateway.dataplane")


def shutdown() -> None:
    """Flush and stop the exporter (at process shutdown); tracing is off afterwards."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def request_span(method: str, path: str, headers: list[tuple[bytes, bytes]], ex: Exchange) -> Any:
    """The request's span (a context manager), continuing the client's ``traceparent``."""
    if _tracer is None:
        return OFF
    return _request_span(_tracer, method, path, headers, ex)


@contextlib.contextmanager
def _request_span(
    tracer: Tracer, method: str, path: str, headers: list[tuple[bytes, bytes]], ex: Exchange
) -> Iterator[None]:
    carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers if name == b"traceparent"}
    parent = _propagator.extract(carrier) if carrier else None
    with tracer.start_as_current_span(f"{method} {path}", context=parent, kind=SpanKind.SERVER) as span:
        try:
            yield
        finally:
            status, outcome, usage, _, _ = ex.final or (500, "failed", {}, "", None)
            key = ex.key
            attributes: dict[str, Any] = {
                "http.request.method": method,
                "url.path": path,
                "http.response.status_code": status,
                "gateway.request_id": ex.request_id,
                "gateway.outcome": outcome,
                "gen_ai.operation.name": OPERATION,
                "gen_ai.provider.name": PROVIDER,
            }
            if key is not None:
                attributes["gateway.tenant_id"] = key.tenant_id
                attributes["gateway.key_prefix"] = key.prefix
            if ex.planned:
                attributes["gen_ai.request.model"] = ex.model
            if ex.upstream_model:
                attributes["gen_ai.response.model"] = ex.upstream_model
            _usage(attributes, usage)
            if ex.error_code:
                attributes["error.type"] = ex.error_code
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.set_attributes(attributes)


def span(name: str) -> Any:
    """A child span of the current one (``gateway.admission``, ``gateway.relay``)."""
    if _tracer is None:
        return OFF
    return _tracer.start_as_current_span(name)


def attempt_span(ex: Exchange, account: AccountInfo, upstream_model: str) -> Any:
    """The span of one upstream attempt (kind CLIENT); its outcome is read from ``ex`` at the end."""
    if _tracer is None:
        return OFF
    return _attempt_span(_tracer, ex, account, upstream_model)


@contextlib.contextmanager
def _attempt_span(tracer: Tracer, ex: Exchange, account: AccountInfo, upstream_model: str) -> Iterator[None]:
    failed_before = len(ex.attempts)
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": OPERATION,
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.request.model": upstream_model,
        "gateway.account_id": account.account_id,
        "gateway.pool_id": account.pool_id,
    }
    with tracer.start_as_current_span(
        f"{OPERATION} {upstream_model}", kind=SpanKind.CLIENT, attributes=attributes
    ) as current:
        try:
            yield
        finally:
            if len(ex.attempts) > failed_before:  # this attempt failed
                failed = ex.attempts[-1]
                current.set_attribute("error.type", failed["outcome"])
                current.set_attribute("http.response.status_code", failed["status"])
                ended: dict[str, Any] = {}
                _usage(ended, failed)
                current.set_attributes(ended)
                current.set_status(Status(StatusCode.ERROR))
            elif ex.final is not None:
                done: dict[str, Any] = {
                    "gen_ai.response.model": upstream_model,
                    "http.response.status_code": ex.final[0],
                }
                _usage(done, ex.final[2])
                if ex.final[3]:
                    done["gen_ai.response.id"] = ex.final[3]
                current.set_attributes(done)


def inject(headers: Any) -> Any:
    """``headers`` (httpx.Headers) with the current span's ``traceparent``: a copy, the shared
    header objects stay untouched. Unchanged while tracing is off."""
    if _tracer is None:
        return headers
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    if not carrier:
        return headers
    copied = headers.copy()
    copied.update(carrier)
    return copied


def trace_id() -> str:
    """The current trace's id (hex) for log lines; "" while tracing is off."""
    if _tracer is None:
        return ""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def _usage(attributes: dict[str, Any], usage: dict[str, Any]) -> None:
    for attribute, field in (
        ("gen_ai.usage.input_tokens", "input_tokens"),
        ("gen_ai.usage.output_tokens", "output_tokens"),
        ("gen_ai.usage.cached_input_tokens", "cached_tokens"),
        ("gen_ai.usage.reasoning_tokens", "reasoning_tokens"),
    ):
        value = usage.get(field)
        if value is not None:
            attributes[attribute] = value
