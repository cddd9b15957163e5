"""``Limits.scope`` (gateway/config/snapshot.py): one immutable scope per budget window."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.config.snapshot import Limits

DAY = 86_400


def test_one_scope_per_window_and_a_new_one_when_the_window_ends() -> None:
    limits = Limits("key", 7, 3, {"rpm": 60, "budget_tokens": 1000, "budget_period": "day"})
    noon = datetime(2026, 12, 5, 12, tzinfo=UTC).timestamp()
    first = limits.scope(noon)
    assert limits.scope(noon + 3600) is first  # same day: the same object
    assert (first.window_start, first.window_end) == (int(noon) - 12 * 3600, int(noon) + 12 * 3600)
    assert (first.rpm, first.budget_tokens, first.tenant_id) == (60, 1000, 3)
    tomorrow = limits.scope(noon + DAY)
    assert tomorrow is not first
    assert (tomorrow.window_start, tomorrow.window_end) == (first.window_end, first.window_end + DAY)
    assert limits.scope(noon + DAY + 60) is tomorrow


def test_a_fixed_window_scope_has_no_budget_outside_it() -> None:
    start, end = datetime(2026, 12, 1, tzinfo=UTC), datetime(2026, 12, 2, tzinfo=UTC)
    limits = Limits(
        "tenant",
        2,
        2,
        {"budget_tokens": 50, "budget_period": "fixed", "budget_window_start": start, "budget_window_end": end},
    )
    inside = limits.scope(start.timestamp() + 10)
    assert inside.budget_tokens == 50
    assert inside.window_end == int(end.timestamp())
    after = limits.scope(end.timestamp() + 10)
    assert after.budget_tokens is None
    assert after.window_start == 0
    assert limits.scope(end.timestamp() + 20) is after
    assert limits.scope(start.timestamp() + 20) == inside


def test_limits_without_a_budget_share_one_scope() -> None:
    limits = Limits("key", 1, 1, {"rpm": 5})
    assert limits.scope(0.0) is limits.scope(10.0**9)
    assert limits.scope(0.0).budget_tokens is None
