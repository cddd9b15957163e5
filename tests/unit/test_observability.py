"""Unit tests of gateway/observability/: the per-request recorder, /metrics access, /readyz's
usage checks, the backlog measures, the log formats and the configuration checks."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as settings_hypothesis
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from accounts.upstream.account import AccountInfo
from gateway.conf import checks as gateway_checks
from gateway.config.snapshot import KeyInfo
from gateway.contract.errors import GatewayError
from gateway.dataplane import app as dataplane_app
from gateway.dataplane.exchange import Exchange
from gateway.metering.backlog import RECORD_BYTES, journal_backlog, stream_backlog
from gateway.observability import exposition
from gateway.observability.logs import AccessLog, TextFormatter, access, json_line, pipe_buf
from gateway.observability.metrics import FLUSH_SECONDS, Metrics, Recorder, _Buckets, token_version

SECRET = "sk-gw-PREFIX0123456789-the-secret-part"


def key(tenant_id: int = 7) -> KeyInfo:
    return KeyInfo(
        key_id=1,
        tenant_id=tenant_id,
        tenant_slug="acme",
        prefix="sk-gw-PREFIX0123",
        digest="d" * 64,
        allowed_models=None,
        expires_at=None,
    )


def usage(inp: int, out: int) -> dict[str, int | None]:
    return {
        "input_tokens": inp,
        "cached_tokens": 0,
        "cache_write_tokens": None,
        "output_tokens": out,
        "reasoning_tokens": 2,
        "total_tokens": inp + out,
    }


def failed_over(started: float) -> Exchange:
    """A streamed request served by account 2 after account 1 answered 500 with some usage."""
    ex = Exchange("req_abc", started)
    ex.key = key()
    ex.model = ex.upstream_model = "gpt-test"
    ex.planned = True
    ex.stream = True
    ex.attempt_started = started + 0.1
    ex.note_attempt(1, "upstream_error", 500, usage(5, 1))
    ex.account = AccountInfo(account_id=2)
    ex.attempt_started = started + 0.5
    ex.finish(200, "completed", usage(10, 21), response_id="resp_1", ttfb_ms=600.0)
    return ex


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    assert found is not None, (name, labels)
    return found


def test_the_recorder_counts_a_failed_over_stream_exactly() -> None:
    registry = CollectorRegistry()
    recorder = Recorder(Metrics(registry))
    ex = failed_over(100.0)
    recorder.request(ex, "responses", Decimal("0.25"), now=102.0)

    genai = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai"}
    models = {**genai, "gen_ai_request_model": "gpt-test", "gen_ai_response_model": "gpt-test"}
    assert value(registry, "gateway_requests_total", route="responses", status="200", error_code="") == 1
    assert value(registry, "gen_ai_server_request_duration_seconds_sum", **models, error_type="") == 2.0
    assert value(registry, "gen_ai_server_time_to_first_token_seconds_sum", **models) == 0.6
    # (2.0 - 0.6) s over the 20 tokens after the first.
    assert value(registry, "gen_ai_server_time_per_output_token_seconds_sum", **models) == pytest.approx(1.4 / 20)
    assert value(registry, "gateway_upstream_attempts_total", account="1", outcome="upstream_error") == 1
    assert value(registry, "gateway_upstream_attempts_total", account="2", outcome="success") == 1
    assert value(registry, "gateway_failovers_total", gen_ai_request_model="gpt-test") == 1
    assert value(registry, "gateway_cost_usd_total", gen_ai_request_model="gpt-test") == 0.25
    # Both attempts' tokens; cache writes were not reported, so not observed.
    assert value(registry, "gen_ai_client_token_usage_sum", **models, gen_ai_token_type="input") == 15
    assert value(registry, "gen_ai_client_token_usage_sum", **models, gen_ai_token_type="output") == 22
    assert value(registry, "gen_ai_client_token_usage_count", **models, gen_ai_token_type="reasoning") == 2
    assert value(registry, "gen_ai_client_token_usage_count", **models, gen_ai_token_type="cache_write") == 0
    client = {**models, "error_type": "500"}
    assert value(registry, "gen_ai_client_operation_duration_seconds_count", **client) == 1
    assert value(registry, "gen_ai_client_operation_duration_seconds_sum", **models, error_type="") == 1.5


def test_refusals_and_unplanned_models_and_tenant_labels() -> None:
    registry = CollectorRegistry()
    recorder = Recorder(Metrics(registry, tenant_labels=True))
    ex = Exchange("req_x", 0.0)
    ex.key = key(tenant_id=9)
    ex.model = "a model a client made up"  # not planned: never a label
    ex.refused_by = "tenant.budget"
    ex.error_code = "budget_exceeded"
    ex.finish(429, "rejected")
    recorder.request(ex, "responses", None, now=1.0)
    who = {"tenant": "9", "key_prefix": "sk-gw-PREFIX0123"}
    assert value(registry, "gateway_refusals_total", scope="tenant", limit="budget", **who) == 1
    assert (
        value(registry, "gateway_requests_total", route="responses", status="429", error_code="budget_exceeded", **who)
        == 1
    )
    exposed = "\n".join(str(metric.samples) for metric in registry.collect())
    assert "made up" not in exposed
    assert "req_x" not in exposed


def test_a_broken_recording_never_fails_the_request(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder(Metrics(CollectorRegistry()))
    ex = failed_over(0.0)
    ex.attempt_seconds.clear()  # inconsistent bookkeeping: the recorder logs and moves on
    recorder.request(ex, "responses", None, now=1.0)
    assert "recording the metrics of req_abc failed" in caplog.text


def test_metrics_access_loopback_or_token() -> None:
    exposition.allowed("127.0.0.1", None, "")
    exposition.allowed("::1", None, "")
    for host in ("10.0.0.8", None, "not-an-address"):
        with pytest.raises(GatewayError) as refused:
            exposition.allowed(host, None, "")
        assert refused.value.status == 403
    token = "t" * 20
    exposition.allowed("10.0.0.8", b"Bearer " + token.encode(), token)
    for sent in (None, b"Bearer wrong", token.encode()):
        with pytest.raises(GatewayError) as refused:
            exposition.allowed("127.0.0.1", sent, token)
        assert refused.value.status == 401


class StubReadiness:
    def __init__(self, down: set[str]) -> None:
        self.down = down

    def is_down(self, name: str) -> bool:
        return name in self.down

    def report(self) -> dict[str, object]:
        return {"status": "degraded" if self.down else "ok", "down": {name: {} for name in self.down}}


class StubRuntime:
    """What /readyz reads of a runtime."""

    def __init__(self, backlog: int, writer_up: bool = True, down: set[str] | None = None) -> None:
        self.readiness = StubReadiness(down or set())
        self.meter = type("Meter", (), {"saturated": False})()
        self.writer = object()
        self._backlog = backlog
        self._writer_up = writer_up

    async def check_redis(self) -> bool:
        return True

    async def usage_backlog(self) -> int:
        return self._backlog

    def writer_up(self) -> bool:
        return self._writer_up


def readyz(runtime: StubRuntime) -> tuple[int, dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(dataplane_app.readyz(send, runtime, Exchange("req_r", 0.0)))  # type: ignore[arg-type]
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_readyz_reports_the_usage_writer_and_the_backlog(settings: Any) -> None:
    settings.GATEWAY_READY_MAX_BACKLOG = 100
    status, report = readyz(StubRuntime(backlog=100))
    assert (status, report["reasons"], report["usage_backlog"]) == (200, [], 100)
    status, report = readyz(StubRuntime(backlog=101))
    assert status == 503
    assert report["reasons"] == ["101 usage records wait to be written (more than 100)"]
    status, report = readyz(StubRuntime(backlog=0, writer_up=False, down={"usage_writer"}))
    assert status == 503
    assert report["reasons"] == ["the usage writer is not running"]
    assert "usage_writer" in report["down"]


def test_journal_backlog_estimates_records_from_segment_bytes(tmp_path: Path) -> None:
    assert journal_backlog(tmp_path / "missing") == 0
    (tmp_path / "1-1.jsonl").write_bytes(b"x" * RECORD_BYTES * 3)
    (tmp_path / "2-1.jsonl").write_bytes(b"x" * RECORD_BYTES * 2)
    (tmp_path / "dead.jsonl").write_bytes(b"x" * RECORD_BYTES * 50)  # set aside: not waiting
    assert journal_backlog(tmp_path) == 5


class StubRedis:
    def __init__(self, groups: list[dict[str, Any]], length: int) -> None:
        self.groups = groups
        self.length = length

    async def exists(self, name: str) -> int:
        return 1

    async def xinfo_groups(self, name: str) -> list[dict[str, Any]]:
        return self.groups

    async def xlen(self, name: str) -> int:
        return self.length


def test_stream_backlog_is_the_writers_lag_plus_pending() -> None:
    lagging = StubRedis(
        [{"name": b"other", "lag": 0, "pending": 0}, {"name": b"gw-writers", "lag": 7, "pending": 3}], 99
    )
    assert asyncio.run(stream_backlog(lagging)) == 10
    unknown_lag = StubRedis([{"name": "gw-writers", "lag": None, "pending": 3}], 40)
    assert asyncio.run(stream_backlog(unknown_lag)) == 43
    no_group = StubRedis([], 12)
    assert asyncio.run(stream_backlog(no_group)) == 12


def test_token_version() -> None:
    assert token_version((1_700_000_000_500_000_000, 42)) == pytest.approx(1_700_000_000.5)
    assert token_version(b"17") == 17.0
    assert token_version(None) == 0.0
    assert token_version(b"not a number") == 0.0


def test_the_json_access_line(settings: Any, capfd: pytest.CaptureFixture[str]) -> None:
    settings.GATEWAY_LOG_FORMAT = "json"
    access(failed_over(10.0), "POST", "/v1/responses", 12.0)
    line = json.loads(capfd.readouterr().err.strip().splitlines()[-1])
    assert (line["logger"], line["level"], line["message"]) == ("gateway.access", "INFO", "POST /v1/responses 200")
    assert (line["request_id"], line["key_prefix"], line["model"], line["attempts"]) == (
        "req_abc",
        "sk-gw-PREFIX0123",
        "gpt-test",
        2,
    )
    assert SECRET not in json.dumps(line)


@settings_hypothesis(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(min_value=0, max_value=1e8, allow_nan=False), max_size=40), split=st.integers(0, 40))
def test_tallied_observations_expose_exactly_what_observe_would(values: list[float], split: int) -> None:
    direct, tallied = CollectorRegistry(), CollectorRegistry()
    bounds = (0.5, 1.0, 4.0, 64.0, 1024.0)
    expected = Histogram("h", "h", ("a",), buckets=bounds, registry=direct).labels("x")
    child = Histogram("h", "h", ("a",), buckets=bounds, registry=tallied).labels("x")
    tally = _Buckets(child, bounds)
    for index, value in enumerate(values):
        expected.observe(value)
        tally.observe(value)
        if index == split:
            tally.flush()  # flushed in two parts: the second adds to the first
    tally.flush()
    tally.flush()  # nothing pending: adds nothing

    def exposed(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
        samples = [
            s for family in text_string_to_metric_families(generate_latest(registry).decode()) for s in family.samples
        ]
        return {(s.name, s.labels.get("le", "")): s.value for s in samples if not s.name.endswith("_created")}

    got, want = exposed(tallied), exposed(direct)
    assert got.keys() == want.keys()
    for name, value in want.items():  # buckets and count exactly; the sum up to float rounding (added in another order)
        assert value == got[name] if name[0] != "h_sum" else math.isclose(value, got[name], rel_tol=1e-12, abs_tol=1e-9)


def test_the_recorder_flushes_its_tallies_within_a_second_in_a_serving_loop() -> None:
    registry = CollectorRegistry()
    recorder = Recorder(Metrics(registry))

    def requests_total() -> float | None:
        return registry.get_sample_value(
            "gateway_requests_total", {"route": "responses", "status": "200", "error_code": ""}
        )

    async def serve() -> tuple[float | None, float | None, float | None]:
        recorder.request(failed_over(10.0), "responses", None, now=12.0)
        recorder.round_trip(0.0004)
        waiting = requests_total()
        await asyncio.sleep(FLUSH_SECONDS + 0.3)
        after_timer = requests_total()
        recorder.request(failed_over(10.0), "responses", None, now=12.0)
        recorder.flush()  # what a scrape of this process and shutdown do
        return waiting, after_timer, requests_total()

    waiting, after_timer, after_flush = asyncio.run(serve())
    assert (waiting, after_timer, after_flush) == (0.0, 1.0, 2.0)  # 0: the child exists, its tally waits
    assert registry.get_sample_value("gateway_redis_round_trip_seconds_count") == 1.0


def test_access_lines_are_batched_into_one_write_and_flushed(tmp_path: Any) -> None:
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    sink = AccessLog(fd, interval=0.05)
    lines = [json_line("POST /v1/responses 200", {"request_id": f"req_{n}"}) for n in range(20)]

    async def serve() -> tuple[bytes, bytes]:
        for line in lines[:10]:
            sink.write(line)
        waiting = path.read_bytes()  # nothing written yet: the batch waits for its timer
        await asyncio.sleep(0.2)
        after_timer = path.read_bytes()
        for line in lines[10:]:
            sink.write(line)
        return waiting, after_timer

    try:
        waiting, after_timer = asyncio.run(serve())
        assert waiting == b""
        assert after_timer == b"".join(lines[:10])
        sink.flush()  # what the runtime does at shutdown: the rest, in order
        written = path.read_bytes().splitlines()
        assert [json.loads(line)["request_id"] for line in written] == [f"req_{n}" for n in range(20)]
        sink.write(lines[0])  # outside an event loop: written at once
        assert path.read_bytes().endswith(lines[0])
    finally:
        os.close(fd)


def test_access_lines_to_a_pipe_go_out_in_whole_lines_of_at_most_pipe_buf() -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    sink = AccessLog(write_end, limit=10**9)
    line = json_line("POST /v1/responses 200", {"request_id": "req_" + "x" * 300})
    sizes: list[int] = []
    try:
        for _ in range(40):  # ~13 KB: more than one PIPE_BUF
            sink._lines.append(line)
        chunks = sink._chunks(sink._lines)
        sizes = [len(chunk) for chunk in chunks]
        assert len(chunks) > 1
        assert all(size <= pipe_buf(write_end) and size % len(line) == 0 for size in sizes)
        sink.flush()
        received = b""
        while len(received) < 40 * len(line):
            received += os.read(read_end, 65536)
        assert received == line * 40
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_line_stamp_is_local_time_with_milliseconds() -> None:
    before = time.time()
    stamp = json.loads(json_line("m", {}))["time"]
    parsed = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert int(before) - 1 <= parsed <= time.time()


def test_the_access_line_has_the_request_and_never_the_secret(caplog: pytest.LogCaptureFixture, settings: Any) -> None:
    settings.GATEWAY_LOG_FORMAT = "text"
    ex = failed_over(10.0)
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        access(ex, "POST", "/v1/responses", 12.0, "ab" * 16)
    (record,) = caplog.records
    fields = record.__dict__
    assert fields["request_id"] == "req_abc"
    assert fields["tenant_id"] == 7
    assert fields["key_prefix"] == "sk-gw-PREFIX0123"
    assert (fields["account_id"], fields["status"], fields["attempts"]) == (2, 200, 2)
    assert (fields["input_tokens"], fields["output_tokens"], fields["latency_ms"], fields["ttfb_ms"]) == (
        10,
        21,
        2000.0,
        600.0,
    )
    line = TextFormatter().format(record)
    assert "request_id=req_abc" in line
    assert "trace_id=" + "ab" * 16 in line
    assert SECRET not in line


def test_e007_e008_log_format_and_metrics_token(settings: Any) -> None:
    settings.GATEWAY_UPSTREAM_TRANSPORT = "httpx"
    settings.GATEWAY_SERVER = "uvicorn"
    settings.GATEWAY_LOG_FORMAT = "json"
    settings.GATEWAY_METRICS_TOKEN = ""
    assert gateway_checks.check_choices() == []
    settings.GATEWAY_LOG_FORMAT = "xml"
    settings.GATEWAY_METRICS_TOKEN = "tiny-t0k"
    found = gateway_checks.check_choices()
    assert [message.id for message in found] == ["gateway.E007", "gateway.E008"]
    assert "tiny-t0k" not in " ".join(message.msg for message in found)  # the token is never echoed
