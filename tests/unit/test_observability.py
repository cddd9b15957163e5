"""Unit tests of gateway/observability/: the per-request recorder, /metrics access, /readyz's
usage checks, the backlog measures, the log formats and the configuration checks."""

from __future__ import annotations

import asyncio
import json
import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from accounts.upstream.account import AccountInfo
from gateway.conf import checks as gateway_checks
from gateway.config.snapshot import KeyInfo
from gateway.contract.errors import GatewayError
from gateway.dataplane import app as dataplane_app
from gateway.dataplane.exchange import Exchange
from gateway.metering.backlog import RECORD_BYTES, journal_backlog, stream_backlog
from gateway.observability import exposition
from gateway.observability.logs import TextFormatter, access
from gateway.observability.metrics import Metrics, Recorder, token_version

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
