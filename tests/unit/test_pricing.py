"""tenancy.pricing: cost of a usage, price versions, budget windows, estimates (pure, no DB)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from tenancy.pricing import (
    Price,
    PriceTable,
    budget_window,
    cost_usd,
    estimate_cost_usd,
    estimate_tokens,
    in_window,
    micros_to_usd,
    usd_to_micros,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def price(
    *,
    id: int = 1,
    model: str = "gpt-test",
    input: str = "2.50",
    cached_input: str = "1.25",
    cache_write: str = "3.75",
    output: str = "10.00",
    reasoning: str | None = None,
    effective_from: datetime = T0,
) -> Price:
    return Price(
        id=id,
        model=model,
        input=Decimal(input),
        cached_input=Decimal(cached_input),
        cache_write=Decimal(cache_write),
        output=Decimal(output),
        reasoning=Decimal(reasoning) if reasoning is not None else None,
        effective_from=effective_from,
    )


def usage(**fields: int | None) -> dict[str, int | None]:
    base: dict[str, int | None] = {
        "input_tokens": None,
        "cached_tokens": None,
        "cache_write_tokens": None,
        "output_tokens": None,
        "reasoning_tokens": None,
        "total_tokens": None,
    }
    base.update(fields)
    return base


# --- cost ---------------------------------------------------------------------------


def test_cost_with_cached_cache_write_and_reasoning_tokens() -> None:
    # input_tokens INCLUDES the 4000 cached and the 1000 cache-write tokens;
    # output_tokens INCLUDES the 500 reasoning tokens.
    u = usage(
        input_tokens=10_000,
        cached_tokens=4_000,
        cache_write_tokens=1_000,
        output_tokens=2_000,
        reasoning_tokens=500,
        total_tokens=12_000,
    )
    # 5000*2.50 + 4000*1.25 + 1000*3.75 + 1500*10 + 500*10 = 41 250 micro-USD
    assert cost_usd(u, price()) == Decimal("0.041250000")
    # A reasoning price of its own applies to the reasoning share of the output only.
    # 5000*2.50 + 4000*1.25 + 1000*3.75 + 1500*10 + 500*12 = 42 250
    assert cost_usd(u, price(reasoning="12")) == Decimal("0.042250000")


def test_cost_counts_no_token_twice() -> None:
    p = price()
    # All input cached: billed once at the cached rate, not input + cached.
    assert cost_usd(usage(input_tokens=1_000_000, cached_tokens=1_000_000, output_tokens=0), p) == Decimal("1.25")
    # All output is reasoning: billed once at the reasoning (= output) rate.
    assert cost_usd(usage(input_tokens=0, output_tokens=1_000_000, reasoning_tokens=1_000_000), p) == Decimal("10")
    # Plain usage: 1M in at 2.50 + 1M out at 10.
    assert cost_usd(usage(input_tokens=1_000_000, output_tokens=1_000_000), p) == Decimal("12.5")


def test_missing_details_bill_at_the_base_rate() -> None:
    p = price(reasoning="20")
    assert cost_usd(usage(input_tokens=1000, output_tokens=100), p) == Decimal("0.0035")  # 2500 + 1000
    assert cost_usd({"input_tokens": 1000, "output_tokens": 100}, p) == Decimal("0.0035")  # keys absent


def test_inconsistent_details_are_clamped_to_their_total() -> None:
    p = price()
    # 50 cached reported out of 10 input: the 10 input tokens are all billed as cached.
    u = usage(input_tokens=10, cached_tokens=50, cache_write_tokens=7, output_tokens=4, reasoning_tokens=9)
    assert cost_usd(u, p) == Decimal("10.00") * 4 / 1_000_000 + Decimal("1.25") * 10 / 1_000_000


@pytest.mark.parametrize(
    "fields",
    [
        {"input_tokens": None, "output_tokens": 10},
        {"input_tokens": 10, "output_tokens": None},
        {},
        {"input_tokens": True, "output_tokens": 1},
        {"input_tokens": -1, "output_tokens": 1},
    ],
)
def test_unknown_tokens_are_an_unknown_cost(fields: dict[str, Any]) -> None:
    assert cost_usd(fields, price()) is None


def test_cost_precision_is_nano_dollars() -> None:
    cheap = price(input="0.01", output="0.01")
    assert cost_usd(usage(input_tokens=1, output_tokens=0), cheap) == Decimal("0.000000010")
    assert cost_usd(usage(input_tokens=0, output_tokens=0), cheap) == Decimal(0)
    # Half-up at the 9th decimal: 1 token at 0.0015/M = 1.5e-9 -> 2e-9.
    assert cost_usd(usage(input_tokens=1, output_tokens=0), price(input="0.0015")) == Decimal("0.000000002")


def test_estimates() -> None:
    assert estimate_tokens(400, 100, 4096) == 101 + 100
    assert estimate_tokens(400, None, 4096) == 101 + 4096
    assert estimate_tokens(0, 0, 4096) == 1
    p = price(reasoning="15")
    # Upper bound: input at max(input, cache_write), output at max(output, reasoning).
    assert estimate_cost_usd(1_000_000, 1_000_000, p) == Decimal("3.75") + Decimal("15")
    actual = cost_usd(
        usage(input_tokens=1000, cached_tokens=500, cache_write_tokens=500, output_tokens=100, reasoning_tokens=50),
        price(),
    )
    assert actual is not None
    assert estimate_cost_usd(1000, 100, price()) >= actual


def test_micros_round_up() -> None:
    assert usd_to_micros(Decimal("12.5")) == 12_500_000
    assert usd_to_micros(Decimal("0.000000001")) == 1  # spend is never undercounted
    assert usd_to_micros(Decimal("0.000002000")) == 2
    assert usd_to_micros(Decimal(0)) == 0
    assert micros_to_usd(12_500_001) == Decimal("12.500001")


# --- price versions -------------------------------------------------------------------


def test_price_table_picks_the_version_effective_at_request_time() -> None:
    v1 = price(id=1, input="1", effective_from=T0)
    v2 = price(id=2, input="2", effective_from=T0 + timedelta(days=30))
    v2_fix = price(id=3, input="2.5", effective_from=T0 + timedelta(days=30))  # same moment, set later
    other = price(id=4, model="gpt-other", input="9", effective_from=T0)
    table = PriceTable([v2_fix, other, v2, v1])
    assert len(table) == 4
    assert table.lookup("gpt-test", T0 - timedelta(seconds=1)) is None  # before any version
    assert table.lookup("gpt-test", T0) == v1
    assert table.lookup("gpt-test", T0 + timedelta(days=30) - timedelta(microseconds=1)) == v1
    assert table.lookup("gpt-test", T0 + timedelta(days=30)) == v2_fix  # ties: the last one set wins
    assert table.lookup("gpt-test", (T0 + timedelta(days=365)).timestamp()) == v2_fix  # epoch seconds work too
    assert table.lookup("gpt-other", T0 + timedelta(days=99)) == other
    assert table.lookup("gpt-unknown", T0) is None


def test_price_table_from_selector_rows() -> None:
    row = {
        "id": 7,
        "model": "m",
        "input": Decimal("1.000000"),
        "cached_input": Decimal("0.5"),
        "cache_write": Decimal("1.25"),
        "output": Decimal("4"),
        "reasoning": None,
        "effective_from": T0,
    }
    found = PriceTable.from_rows([row]).lookup("m", T0 + timedelta(hours=1))
    assert found is not None
    assert found.id == 7
    assert found.reasoning is None
    assert cost_usd(usage(input_tokens=1_000_000, output_tokens=1_000_000), found) == Decimal(5)


# --- budget windows ---------------------------------------------------------------------


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


def test_day_window() -> None:
    assert budget_window("day", utc(2026, 3, 31, 23, 59, 59)) == (utc(2026, 3, 31), utc(2026, 4, 1))
    assert budget_window("day", utc(2026, 4, 1)) == (utc(2026, 4, 1), utc(2026, 4, 2))


def test_week_window_is_the_iso_week_from_monday_utc() -> None:
    monday, next_monday = utc(2026, 3, 2), utc(2026, 3, 9)  # 2026-03-02 is a Monday
    assert budget_window("week", monday) == (monday, next_monday)
    assert budget_window("week", utc(2026, 3, 8, 23, 59, 59, 999999)) == (monday, next_monday)  # Sunday night
    assert budget_window("week", next_monday) == (next_monday, utc(2026, 3, 16))
    # A week spanning a month and a year boundary: Monday 2025-12-29 .. Monday 2026-01-05.
    assert budget_window("week", utc(2026, 1, 1, 12)) == (utc(2025, 12, 29), utc(2026, 1, 5))
    # Offsets are converted to UTC first: Monday 01:00 at +02:00 is still Sunday in UTC.
    local = datetime(2026, 3, 9, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert budget_window("week", local) == (monday, next_monday)


def test_month_window() -> None:
    assert budget_window("month", utc(2026, 1, 31, 23, 59, 59)) == (utc(2026, 1, 1), utc(2026, 2, 1))
    assert budget_window("month", utc(2026, 2, 1)) == (utc(2026, 2, 1), utc(2026, 3, 1))
    assert budget_window("month", utc(2028, 2, 29, 12)) == (utc(2028, 2, 1), utc(2028, 3, 1))  # leap year
    assert budget_window("month", utc(2026, 12, 31, 23, 59)) == (utc(2026, 12, 1), utc(2027, 1, 1))
    local = datetime(2026, 5, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))  # still April in UTC
    start, end = budget_window("month", local)
    assert (start, end) == (utc(2026, 4, 1), utc(2026, 5, 1))
    assert start.tzinfo is UTC


def test_fixed_window() -> None:
    start, end = utc(2026, 1, 10), utc(2026, 2, 10)
    window = budget_window("fixed", utc(2026, 6, 1), start, end)
    assert window == (start, end)
    assert not in_window(window, utc(2026, 6, 1))  # outside: the budget does not apply
    assert in_window(window, start)
    assert not in_window(window, end)


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("fixed", utc(2026, 1, 1), None, utc(2026, 2, 1)),
        ("fixed", utc(2026, 1, 1), utc(2026, 2, 1), utc(2026, 2, 1)),
        ("fixed", utc(2026, 1, 1), datetime(2026, 1, 1), utc(2026, 2, 1)),
        ("year", utc(2026, 1, 1), None, None),
        ("day", datetime(2026, 1, 1), None, None),
    ],
)
def test_bad_windows(period: str, now: datetime, start: datetime | None, end: datetime | None) -> None:
    with pytest.raises(ValueError, match=r"."):
        budget_window(period, now, start, end)
