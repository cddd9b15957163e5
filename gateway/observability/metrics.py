"""The gateway's Prometheus metrics and the one per-request hook that feeds them.

Names follow the OpenTelemetry GenAI semantic conventions, version **1.37.0** (status
"development"), where they define a metric, translated to Prometheus the way the OpenTelemetry
Prometheus exporter does (dots -> underscores, the unit as a suffix):

=========================================  ==============================================
OpenTelemetry instrument                   Prometheus family here
=========================================  ==============================================
``gen_ai.server.request.duration``         ``gen_ai_server_request_duration_seconds``
``gen_ai.server.time_to_first_token``      ``gen_ai_server_time_to_first_token_seconds``
``gen_ai.server.time_per_output_token``    ``gen_ai_server_time_per_output_token_seconds``
``gen_ai.client.operation.duration``       ``gen_ai_client_operation_duration_seconds``
``gen_ai.client.token.usage``              ``gen_ai_client_token_usage``
=========================================  ==============================================

with the attributes ``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``,
``gen_ai.response.model`` and ``error.type`` as labels (dots -> underscores). Our stable names for
what the conventions do not cover start with ``gateway_``. docs/operations.md lists each one.

Contract of the hot path: :meth:`Recorder.request` runs once per request, in the app's settle
step (after the usage event is built); it does a dict lookup for the request's pre-bound label
children (:class:`_Bound`, cached per label tuple) and adds to their tallies (:class:`_Count`,
:class:`_Buckets`: plain numbers, no lock), and never raises into the request. The tallies go
into prometheus-client's values at most :data:`FLUSH_SECONDS` later, before every scrape of
this process and at shutdown (:meth:`Recorder.flush`): one ``inc`` per bucket and label set
touched, not per observation. Measured under ``make bench`` at 16 concurrent, prometheus-client
called per request cost the serving process ~24 µs of CPU a request
(bench/results/20261205T203247Z.json: ``nolog`` 348 µs against ``bare`` 324 µs); see
docs/performance.md for the tallies' figure. Labels are bounded: models are only those the
configuration knows (anything else is ``""``), statuses and error codes are the gateway's own, tenants and
key prefixes appear only with ``GATEWAY_METRICS_TENANT_LABELS``, request ids never.

Several worker processes: with ``PROMETHEUS_MULTIPROC_DIR`` set before this module is first
imported, prometheus-client keeps every value in a per-process file there and
:mod:`gateway.observability.exposition` adds them up at scrape time.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from gateway.config.snapshot import Limits
    from gateway.dataplane.exchange import Exchange

logger = logging.getLogger(__name__)

SEMCONV_VERSION = "1.37.0"
PROVIDER = "openai"  # gen_ai.provider.name: every upstream speaks OpenAI's Responses API
OPERATION = "chat"  # gen_ai.operation.name of a Responses call

# Bucket boundaries: the conventions' advice (seconds; tokens).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
REDIS_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# gen_ai.token.type: the conventions define "input" and "output"; the other three are ours.
TOKEN_TYPES = (
    ("input", "input_tokens"),
    ("cached_input", "cached_tokens"),
    ("cache_write", "cache_write_tokens"),
    ("output", "output_tokens"),
    ("reasoning", "reasoning_tokens"),
)
SEMCONV_TOKEN_TYPES = frozenset({"input", "output"})
GENAI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model")
TENANT = ("tenant", "key_prefix")
# Past this many label combinations the caches of bound children start over (the families keep them).
MAX_BOUND = 10_000
# Seconds a tally waits at most before it reaches prometheus-client's values (and other workers' scrapes).
FLUSH_SECONDS = 1.0


class Metrics:
    """Every metric family of a serving process, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry = REGISTRY, *, tenant_labels: bool = False) -> None:
        self.tenant_labels = tenant_labels
        who: tuple[str, ...] = TENANT if tenant_labels else ()
        r = registry
        self.requests = Counter(
            "gateway_requests", "Data-plane requests answered, by route, status and error code.",
            ("route", "status", "error_code", *who), registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "gen_ai_server_request_duration_seconds", "gen_ai.server.request.duration: time to the last byte.",
            (*GENAI, "error_type", *who), buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds", "gen_ai.server.time_to_first_token: time to the first byte.",
            (*GENAI, *who), buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "gen_ai.server.time_per_output_token: streams, after the first token.",
            (*GENAI, *who), buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.client_duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "gen_ai.client.operation.duration: one upstream attempt.",
            (*GENAI, "error_type"), buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.token_usage = Histogram(
            "gen_ai_client_token_usage", "gen_ai.client.token.usage: tokens an upstream reported, failed calls too.",
            (*GENAI, "gen_ai_token_type", *who), buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.cost = Counter(
            "gateway_cost_usd", "Cost billed (USD), failed attempts included.", ("gen_ai_request_model", *who),
            registry=r,
        )  # fmt: skip
        self.refusals = Counter(
            "gateway_refusals", "Requests refused by a limit: scope key|tenant, limit rpm|tpm|concurrency|budget.",
            ("scope", "limit", *who), registry=r,
        )  # fmt: skip
        self.attempts = Counter(
            "gateway_upstream_attempts", "Upstream attempts by account and outcome.", ("account", "outcome"),
            registry=r,
        )  # fmt: skip
        self.failovers = Counter(
            "gateway_failovers", "Attempts made after a failed one (another account, target or model).",
            ("gen_ai_request_model",), registry=r,
        )  # fmt: skip
        self.transitions = Counter(
            "gateway_account_transitions", "Account health transitions seen by this process.",
            ("account", "to_state"), registry=r,
        )  # fmt: skip
        self.redis_round_trip = Histogram(
            "gateway_redis_round_trip_seconds", "Round trip of the admission script call (Redis mode).",
            buckets=REDIS_BUCKETS, registry=r,
        )  # fmt: skip
        self.config_reloads = Counter("gateway_config_reloads", "Config snapshots built.", registry=r)

        # Gauges, sampled in the background (gateway/observability/sampler.py); the mode says how
        # several workers' values combine (prometheus-client multiprocess mode).
        def gauge(name: str, doc: str, mode: Any, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, multiprocess_mode=mode, registry=r)

        self.account_health = gauge(
            "gateway_account_health",
            "1 for each account's current health state (healthy, cooling, circuit_open, disabled), else 0.",
            "mostrecent",
            ("account", "state"),
        )
        self.budget_remaining = gauge(
            "gateway_budget_remaining_usd",
            "Budget left in the tenant's window (tenant labels on only).",
            "mostrecent",
            ("tenant",),
        )
        self.usage_pending = gauge(
            "gateway_usage_pending_records",
            "Usage records held in serving processes' memory, not yet on disk or in the stream.",
            "livesum",
        )
        self.usage_backlog = gauge(
            "gateway_usage_backlog_records",
            "Usage records waiting for the usage writer (Redis: the stream group's lag plus pending; "
            "embedded: journal bytes / 512, an estimate).",
            "livemax",
        )
        self.writer_up = gauge("gateway_usage_writer_up", "1 while every process's usage writer child runs.", "livemin")
        self.dependency_up = gauge(
            "gateway_dependency_up",
            "1 while a dependency answers (0 while any process sees it down).",
            "livemin",
            ("dependency",),
        )
        self.snapshot_version = gauge(
            "gateway_config_snapshot_version",
            "The config change token in force (Redis: the counter; embedded: the token file's mtime, Unix seconds).",
            "livemax",
        )
        self.snapshot_age = gauge(
            "gateway_config_snapshot_age_seconds",
            "Age of the oldest config snapshot a process serves from.",
            "livemax",
        )


class _Count:
    """A counter child's increments, added up until :meth:`flush` (hot path: one float addition)."""

    __slots__ = ("child", "pending")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.pending = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.pending += amount

    def flush(self) -> None:
        if self.pending:
            self.child.inc(self.pending)
            self.pending = 0.0


class _Buckets:
    """A histogram child's observations, counted per bucket until :meth:`flush`.

    prometheus-client has no way to add many observations at once, so the flush adds each
    bucket's count to the child's bucket values (``_buckets``, one per upper bound, ``+Inf``
    last) and the total to its ``_sum``: exactly what as many ``observe`` calls would have
    added (``tests/unit/test_observability.py`` compares the two expositions over random values,
    so a prometheus-client that changed those attributes fails a test, not a scrape)."""

    __slots__ = ("bounds", "child", "counts", "seen", "total")

    def __init__(self, child: Any, bounds: Sequence[float]) -> None:
        self.child = child
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.seen = False

    def observe(self, value: float) -> None:
        # The first bucket whose upper bound is >= value, as Histogram.observe picks it.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.seen = True

    def flush(self) -> None:
        if not self.seen:
            return
        buckets = self.child._buckets
        counts = self.counts
        for index, count in enumerate(counts):
            if count:
                buckets[index].inc(count)
                counts[index] = 0
        self.child._sum.inc(self.total)
        self.total = 0.0
        self.seen = False


class _Bound:
    """The children of one request label combination, bound once, with their tallies."""

    __slots__ = ("cost", "duration", "failovers", "requests", "tokens", "tpot", "ttft")

    def __init__(self, m: Metrics, route: str, status: int, code: str, model: str, upstream: str, who: tuple[str, ...]):
        genai = (OPERATION, PROVIDER, model, upstream)
        self.requests = _Count(m.requests.labels(route, str(status), code, *who))
        self.duration = _Buckets(m.request_duration.labels(*genai, code, *who), DURATION_BUCKETS)
        self.ttft = _Buckets(m.ttft.labels(*genai, *who), TTFT_BUCKETS)
        self.tpot = _Buckets(m.tpot.labels(*genai, *who), TPOT_BUCKETS)
        self.cost = _Count(m.cost.labels(model, *who))
        self.failovers = _Count(m.failovers.labels(model))
        self.tokens = tuple(
            (field, _Buckets(m.token_usage.labels(*genai, kind, *who), TOKEN_BUCKETS), kind in SEMCONV_TOKEN_TYPES)
            for kind, field in TOKEN_TYPES
        )  # fmt: skip

    def flush(self) -> None:
        for tally in (self.requests, self.duration, self.ttft, self.tpot, self.cost, self.failovers):
            tally.flush()
        for _, tally, _ in self.tokens:
            tally.flush()


class _BoundAttempt:
    __slots__ = ("count", "duration")

    def __init__(self, m: Metrics, account: int, outcome: str, model: str, upstream: str, error: str) -> None:
        self.count = _Count(m.attempts.labels(str(account), outcome))
        self.duration = _Buckets(
            m.client_duration.labels(OPERATION, PROVIDER, model, upstream, error), DURATION_BUCKETS
        )

    def flush(self) -> None:
        self.count.flush()
        self.duration.flush()


class Recorder:
    """Turns a finished request (its :class:`Exchange`) into metric updates: :meth:`request`.

    Outside a running event loop (a management command, a test) every request is flushed at
    once; in a serving process a timer flushes :data:`FLUSH_SECONDS` after the first tally."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._tenant_labels = metrics.tenant_labels
        self._bound: dict[tuple[Any, ...], _Bound] = {}
        self._bound_attempts: dict[tuple[Any, ...], _BoundAttempt] = {}
        self._dirty: set[_Bound | _BoundAttempt | _Buckets] = set()
        self._timer: asyncio.TimerHandle | None = None
        # One Redis round trip per request in Redis mode: tallied too (Runtime passes its observe).
        self.redis_round_trip = _Buckets(metrics.redis_round_trip, REDIS_BUCKETS)
        # Tenant labels on: the limits of each tenant seen with a money budget (its remaining
        # budget is sampled, gateway_budget_remaining_usd); at most one entry a tenant.
        self.budgeted: dict[int, Limits] = {}

    def request(self, ex: Exchange, route: str, cost: Decimal | None, now: float) -> None:
        """Count one answered request (``now``: ``time.monotonic()`` at its end). Never raises."""
        try:
            self._request(ex, route, cost, now)
        except Exception:  # a metric must never fail a request
            logger.exception("recording the metrics of %s failed", ex.request_id)
        self._schedule()

    def round_trip(self, seconds: float) -> None:
        """One Redis round trip of the data plane (``gateway_redis_round_trip_seconds``)."""
        self.redis_round_trip.observe(seconds)
        self._dirty.add(self.redis_round_trip)
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._timer = loop.call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Add every tally to prometheus-client's values now (a scrape of this process, shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        dirty, self._dirty = self._dirty, set()
        for tally in dirty:
            try:
                tally.flush()
            except Exception:
                logger.exception("flushing a metric failed")

    def _request(self, ex: Exchange, route: str, cost: Decimal | None, now: float) -> None:
        final = ex.final
        if final is None:
            return
        status, outcome, usage, _, ttfb_ms = final
        model = ex.model if ex.planned else ""
        upstream = ex.upstream_model
        code = ex.error_code
        key = ex.key
        who: tuple[str, ...] = ()
        if self._tenant_labels and key is not None:
            who = (str(key.tenant_id), key.prefix)
            limits = key.tenant_limits
            if limits is not None and limits.budget_micros is not None:
                self.budgeted[key.tenant_id] = limits
        label = (route, status, code, model, upstream, who)
        bound = self._bound.get(label)
        if bound is None:
            bound = self._bind(label)
        self._dirty.add(bound)
        bound.requests.inc()
        latency = now - ex.started
        bound.duration.observe(latency)
        if ttfb_ms is not None and ex.stream:  # a JSON answer's first byte is its whole: the duration
            ttft = ttfb_ms / 1000
            bound.ttft.observe(ttft)
            output = usage.get("output_tokens")
            if output is not None and output > 1:
                bound.tpot.observe((latency - ttft) / (output - 1))
        if cost is not None:
            bound.cost.inc(float(cost))
        if ex.refused_by:
            scope, _, limit = ex.refused_by.partition(".")
            self.metrics.refusals.labels(scope, limit, *who).inc()
        attempts = ex.attempts
        made = len(attempts)
        if attempts:
            seconds = ex.attempt_seconds
            for index, attempt in enumerate(attempts):
                self._attempt(attempt["account_id"], attempt["outcome"], model, upstream, seconds[index], attempt)
                _tokens(bound.tokens, attempt)
        if ex.attempt_started and ex.account is not None:
            # The attempt that answered (or was under way when the client left).
            made += 1
            final_outcome = "success" if status < 400 else "upstream_rejected"
            if outcome == "client_disconnected":
                final_outcome = outcome
            self._attempt(ex.account.account_id, final_outcome, model, upstream, now - ex.attempt_started, None)
            _tokens(bound.tokens, usage)
        if made > 1:
            bound.failovers.inc(made - 1)

    def _bind(self, label: tuple[Any, ...]) -> _Bound:
        if len(self._bound) >= MAX_BOUND:
            self.flush()  # the tallies of the bindings about to be dropped
            self._bound.clear()
        route, status, code, model, upstream, who = label
        bound = self._bound[label] = _Bound(self.metrics, route, status, code, model, upstream, who)
        return bound

    def _attempt(
        self, account: int, outcome: str, model: str, upstream: str, seconds: float, failed: dict[str, Any] | None
    ) -> None:
        error = "" if failed is None else (outcome if failed["status"] == 200 else str(failed["status"]))
        label = (account, outcome, model, upstream, error)
        bound = self._bound_attempts.get(label)
        if bound is None:
            if len(self._bound_attempts) >= MAX_BOUND:
                self.flush()
                self._bound_attempts.clear()
            bound = self._bound_attempts[label] = _BoundAttempt(self.metrics, *label)
        self._dirty.add(bound)
        bound.count.inc()
        bound.duration.observe(seconds)


def _tokens(children: Sequence[tuple[str, _Buckets, bool]], usage: dict[str, Any]) -> None:
    """Observe the token counts the upstream reported (None: not reported, not observed).
    ``input`` and ``output`` are observed whatever their value; the other types (ours) only
    when not 0, which saves three observations on most calls (the sums stay exact)."""
    for field, child, always in children:
        value = usage.get(field)
        if value is not None and (value or always):
            child.observe(value)


_families: Metrics | None = None


def metrics_families() -> Metrics:
    """The process's metric families on the default registry, made once (a family can be
    registered only once per registry)."""
    global _families
    if _families is None:
        from django.conf import settings

        _families = Metrics(tenant_labels=settings.GATEWAY_METRICS_TENANT_LABELS)
    return _families


def token_version(token: object) -> float:
    """A config change token as a number: Redis's counter, or the token file's mtime (seconds)."""
    if isinstance(token, tuple) and token:  # embedded: (st_mtime_ns, st_ino)
        return float(token[0]) / 1e9
    if isinstance(token, bytes | str | int | float):
        try:
            return float(token)
        except ValueError:
            return 0.0
    return 0.0
