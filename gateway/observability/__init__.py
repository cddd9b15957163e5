"""Observability of the data plane: Prometheus metrics, structured logs and OpenTelemetry traces.

- :mod:`.metrics`: the metric families (OpenTelemetry GenAI semantic conventions where they
  define one, mapped to Prometheus names) and :class:`~.metrics.Recorder`, the one per-request hook.
- :mod:`.sampler`: the gauges each serving process samples in the background.
- :mod:`.exposition`: ``GET /metrics`` (one process or several, protected).
- :mod:`.logs`: the JSON and text formatters, the access line of each request.
- :mod:`.tracing`: spans (off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set), ``traceparent``.

Nothing here ever receives a secret: keys appear as their public prefix, prompts never.
"""
