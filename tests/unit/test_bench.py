"""The benchmark's accounting (issue 10, item 21): failed requests are not throughput, and a
scenario with any failed request fails its budget line."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import pytest

from bench import run as bench

WRK_OUTPUT = """Running 3s test @ http://127.0.0.1:8000/v1/responses
  2 threads and 16 connections
  Non-2xx or 3xx responses: {status}
Requests/sec:   3333.33
BENCH {summary}
"""


def wrk_stdout(requests: int, status: int = 0, connect: int = 0, read: int = 0, timeouts: int = 0) -> str:
    summary = {
        "requests": requests,
        "duration_us": 2_000_000,
        "bytes": requests * 900,
        "status_errors": status,
        "connect_errors": connect,
        "read_errors": read,
        "write_errors": 0,
        "timeouts": timeouts,
        "p50_us": 400,
        "p90_us": 900,
        "p99_us": 3000,
        "mean_us": 480.5,
        "max_us": 9000,
    }
    return WRK_OUTPUT.format(status=status, summary=json.dumps(summary))


def test_wrk_summary_counts_failed_answers_and_socket_errors() -> None:
    result = bench.parse_wrk(wrk_stdout(10_000, status=2_000, connect=1, read=2, timeouts=3))
    assert (result.requests, result.status_errors, result.socket_errors, result.errors) == (10_000, 2_000, 6, 2_006)
    assert result.rps == 4_000  # 8,000 good answers in 2 s: the 2,000 errors are not throughput
    assert (result.p50_ms, result.p99_ms) == (0.4, 3.0)


def test_wrk_output_without_a_summary_is_an_error() -> None:
    with pytest.raises(bench.BenchError):
        bench.parse_wrk("unable to connect to 127.0.0.1:8000 Connection refused\n")


def runs(stdout: str) -> list[dict[str, Any]]:
    return [asdict(bench.parse_wrk(stdout))]


def rows_with(gateway_throughput: str) -> dict[str, bench.Row]:
    """The budget rows of a run whose gateway made 10,000 requests at 16 concurrent (5,000 good/s
    without errors, far above the budget), everything else clean."""
    clean = wrk_stdout(10_000)
    result = bench.Bench(bench.QUICK)
    result.raw["latency_c1"] = {"direct": runs(clean), "gateway": runs(clean)}
    result.raw["throughput_c16"] = {"direct": runs(clean), "gateway": runs(gateway_throughput)}
    return {row.label: row for row in result.rows()}


def test_a_clean_run_passes_its_budget_line() -> None:
    rows = rows_with(wrk_stdout(10_000))
    assert (rows["req/s @16"].values["gateway"], rows["req/s @16"].passed, rows["req/s @16"].errors) == (5_000, True, 0)
    assert rows["failed requests, all wrk runs"].values == {"direct": 0, "gateway": 0}


@pytest.mark.parametrize(
    "stdout", [wrk_stdout(10_000, status=1), wrk_stdout(10_000, read=1)], ids=["answer >= 400", "socket error"]
)
def test_one_failed_request_fails_the_budget_line(stdout: str) -> None:
    rows = rows_with(stdout)
    row = rows["req/s @16"]
    assert row.values["gateway"] is not None
    assert row.values["gateway"] > 1000  # the rate alone would pass
    assert (row.passed, row.errors) == (False, 1)
    assert rows["failed requests, all wrk runs"].values["gateway"] == 1
    printed = bench.render(bench.table(list(rows.values())))
    assert "FAIL: 1 errors" in printed
    assert rows["added p50 @1 (ms)"].passed is True  # other scenarios are judged on their own runs


def test_errors_only_fail_a_line_without_value() -> None:
    result = bench.Bench(bench.QUICK)
    result.raw["throughput_c16"] = {"gateway": runs(wrk_stdout(0, connect=16))}  # nothing answered at all
    row = {r.label: r for r in result.rows()}["req/s @16"]
    assert (row.passed, row.errors) == (False, 16)


def test_variants_from_another_checkout_are_parsed(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "manage.py").write_text("")
    monkeypatch.setenv("BENCH_VARIANTS", f"httpx:GATEWAY_UPSTREAM_TRANSPORT=httpx; base@{tmp_path}:")
    variants = bench.extra_variants()
    assert variants["httpx"] == bench.Variant({"GATEWAY_UPSTREAM_TRANSPORT": "httpx"}, None)
    assert variants["base"] == bench.Variant({}, str(tmp_path))


@pytest.mark.parametrize("spec", ["gateway:A=1", "x@/nonexistent-checkout:", "no-colon"])
def test_bad_variants_are_refused(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_VARIANTS", spec)
    with pytest.raises(bench.BenchError):
        bench.extra_variants()


def test_the_live_view_row_compares_lines_received_with_requests_answered() -> None:
    result = bench.Bench(bench.QUICK)
    result.raw["throughput_c16"] = {"watched": runs(wrk_stdout(10_000))}
    result.info["live_view"] = {"lines": 9_990, "requests": 10_000.0}
    rows = {r.label: r for r in result.rows()}
    assert rows["live view lines / requests answered"].values == {"watched": 0.999}
    printed = bench.render(bench.table(list(rows.values())))
    header = printed.splitlines()[0]
    line = next(line for line in printed.splitlines() if line.startswith("| live view"))
    cells = [cell.strip() for cell in line.split("|")]
    assert cells[[cell.strip() for cell in header.split("|")].index("watched")] == "0.999"


def test_the_scale_scenario_fills_every_column_of_the_key_table() -> None:
    """bench/scale.py COPYs keys row by row: a column added to ApiKey that it cannot fill made
    ``make bench`` fail at its last scenario (``previous_prefix``, added by key rotation)."""
    from datetime import UTC, datetime

    from bench.scale import key_row_template
    from tenancy.models import ApiKey

    fields, template = key_row_template(datetime(2026, 1, 1, tzinfo=UTC))
    assert [f.name for f in fields] == [f.name for f in ApiKey._meta.concrete_fields if not f.primary_key]
    row = dict(zip([f.name for f in fields], template, strict=True))
    assert row["previous_prefix"] == ""
    assert row["rotation_secret_encrypted"] == ""
    assert row["previous_valid_until"] is None
    for name in ("tenant", "prefix", "digest"):  # filled in per key
        assert row[name] is None
