"""The account health state machine (accounts/health/machine.py): pure, so every rule is pinned exactly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from accounts.health.machine import (
    Admission,
    AuthFailure,
    Health,
    HealthMachine,
    HealthPolicy,
    RateLimited,
    Reset,
    ServerError,
    State,
    Success,
    Transition,
    error_code,
    event_for_exception,
    event_for_status,
    parse_duration,
    rate_limit_event,
    ratelimit_reset_seconds,
    retry_after_seconds,
)
from accounts.upstream.client import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout

T0 = 1_700_000_000.0


class FixedRandom:
    """A random source that always returns ``value`` (0: lowest jitter, ~1: highest)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def machine(jitter_draw: float = 0.5, **policy: object) -> HealthMachine:
    return HealthMachine(HealthPolicy(**policy), FixedRandom(jitter_draw))  # type: ignore[arg-type]


def test_unknown_account_is_healthy_and_admitted() -> None:
    health = Health(7)
    assert health.state is State.HEALTHY
    assert health.admission(T0) is Admission.ADMIT
    assert health.usable(T0)
    assert health.is_pristine()


# --- 429 ---------------------------------------------------------------------------------


def test_burst_429_without_hint_backs_off_about_a_second() -> None:
    health, transition = machine(0.5).on_rate_limited(Health(1), T0)
    assert health.state is State.COOLING
    assert health.until == pytest.approx(T0 + 1.0)
    assert health.rate_limits == 1
    assert transition == Transition(1, State.HEALTHY, State.COOLING, health.reason, T0, health.until)
    assert "no hint" in transition.reason
    assert health.admission(T0 + 0.99) is Admission.DENY
    assert health.admission(T0 + 1.0) is Admission.ADMIT


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 0.8), (0.999999, 1.2), (0.25, 0.9)])
def test_backoff_jitter_bounds(draw: float, expected: float) -> None:
    health, _ = machine(draw).on_rate_limited(Health(1), T0)
    assert health.until == pytest.approx(T0 + expected, abs=1e-5)


def test_backoff_jitter_stays_within_bounds_with_a_real_random_source() -> None:
    import random

    m = HealthMachine(HealthPolicy(), random.Random(42))
    delays = [m.backoff(1) for _ in range(2000)]
    assert min(delays) >= 0.8
    assert max(delays) <= 1.2
    assert max(delays) - min(delays) > 0.3  # it does vary


def test_backoff_grows_on_repeats_up_to_the_cap() -> None:
    m = machine(0.5)
    health, now = Health(1), T0
    seen = []
    for _ in range(9):
        health, transition = m.on_rate_limited(health, now)
        assert transition is not None  # each repeat after expiry is a new cooldown episode
        assert health.until is not None
        seen.append(round(health.until - now, 6))
        now = health.until  # the cooldown expired; the next request is limited again
    assert seen == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert health.rate_limits == 9


def test_jittered_backoff_never_exceeds_the_cap() -> None:
    m = machine(0.999999)
    assert m.backoff(30) == 60.0


def test_success_after_cooldown_resets_the_growth() -> None:
    m = machine(0.5)
    health, _ = m.on_rate_limited(Health(1), T0)
    health, _ = m.on_rate_limited(health, T0 + 1)
    assert health.rate_limits == 2
    health, transition = m.on_success(health, T0 + 10)
    assert transition is not None
    assert (transition.from_state, transition.to_state) == (State.COOLING, State.HEALTHY)
    assert health.rate_limits == 0
    health, _ = m.on_rate_limited(health, T0 + 20)
    assert health.until == pytest.approx(T0 + 21)


def test_retry_after_sets_the_deadline_exactly() -> None:
    health, transition = machine().on_rate_limited(Health(1), T0, retry_after=7.5, reset_hint=60.0)
    assert health.until == T0 + 7.5
    assert transition is not None
    assert "retry-after" in transition.reason


def test_reset_hint_is_used_without_retry_after() -> None:
    health, transition = machine().on_rate_limited(Health(1), T0, reset_hint=360.0)
    assert health.until == T0 + 360.0
    assert transition is not None
    assert "x-ratelimit-reset" in transition.reason


def test_hints_are_clamped() -> None:
    m = machine(max_hint=100.0)
    assert m.on_rate_limited(Health(1), T0, retry_after=10_000.0).health.until == T0 + 100.0
    assert m.on_rate_limited(Health(1), T0, retry_after=-5.0).health.until == T0


def test_hints_do_not_grow_with_repeats() -> None:
    m = machine()
    health, _ = m.on_rate_limited(Health(1), T0, retry_after=2.0)
    health, _ = m.on_rate_limited(health, T0 + 2, retry_after=2.0)
    assert health.until == T0 + 4.0


def test_quota_exhausted_cools_down_long() -> None:
    m = machine(quota_cooldown=3600.0)
    health, transition = m.on_rate_limited(Health(1), T0, retry_after=1.0, quota_exhausted=True)
    assert health.state is State.COOLING
    assert health.until == T0 + 3600.0
    assert transition is not None
    assert "insufficient_quota" in transition.reason
    # A longer hint wins over the default quota cooldown.
    longer, _ = m.on_rate_limited(Health(1), T0, retry_after=7200.0, quota_exhausted=True)
    assert longer.until == T0 + 3600.0  # clamped by max_hint (3600)
    m2 = machine(quota_cooldown=60.0)
    assert m2.on_rate_limited(Health(1), T0, retry_after=600.0, quota_exhausted=True).health.until == T0 + 600.0


def test_a_burst_of_concurrent_429s_does_not_grow_the_backoff() -> None:
    m = machine(0.5)
    health, _ = m.on_rate_limited(Health(1), T0)
    again, transition = m.on_rate_limited(health, T0 + 0.1)
    assert transition is None
    assert again == health  # same streak, same deadline


def test_a_later_hint_during_a_cooldown_extends_it_silently() -> None:
    m = machine()
    health, _ = m.on_rate_limited(Health(1), T0, retry_after=2.0)
    extended, transition = m.on_rate_limited(health, T0 + 1, retry_after=5.0)
    assert transition is None
    assert extended.until == T0 + 6.0
    shorter, _ = m.on_rate_limited(extended, T0 + 1, retry_after=1.0)
    assert shorter.until == T0 + 6.0


def test_quota_during_a_burst_cooldown_is_recorded() -> None:
    m = machine(quota_cooldown=3600.0)
    health, _ = m.on_rate_limited(Health(1), T0, retry_after=2.0)
    upgraded, transition = m.on_rate_limited(health, T0 + 1, quota_exhausted=True)
    assert transition is not None
    assert (transition.from_state, transition.to_state) == (State.COOLING, State.COOLING)
    assert upgraded.until == T0 + 3601.0
    again, transition = m.on_rate_limited(upgraded, T0 + 2, quota_exhausted=True)
    assert transition is None
    assert again == upgraded


def test_success_during_a_cooldown_is_stale() -> None:
    m = machine()
    health, _ = m.on_rate_limited(Health(1), T0, retry_after=10.0)
    assert m.on_success(health, T0 + 5) == (health, None)


def test_expired_cooldown_reads_healthy() -> None:
    health, _ = machine().on_rate_limited(Health(1), T0, retry_after=10.0)
    assert health.effective_state(T0 + 5) is State.COOLING
    assert health.effective_state(T0 + 10) is State.HEALTHY


# --- auth --------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "words"), [(401, "credential rejected"), (403, "access forbidden")])
def test_auth_failure_disables_with_a_reason(status: int, words: str) -> None:
    m = machine()
    health, transition = m.on_auth_failure(Health(1), T0, status, "invalid_api_key")
    assert health.state is State.DISABLED
    assert health.until is None
    assert transition is not None
    assert transition.to_state is State.DISABLED
    assert str(status) in transition.reason
    assert "invalid_api_key" in transition.reason
    assert words in transition.reason
    assert health.admission(T0 + 10**6) is Admission.DENY


def test_disabled_ignores_everything_but_a_reset() -> None:
    m = machine()
    health, _ = m.on_auth_failure(Health(1), T0, 401)
    for event in (Success(), RateLimited(1.0), ServerError("500"), AuthFailure(403)):
        assert m.apply(health, event, T0 + 1) == (health, None)
    reset, transition = m.apply(health, Reset("reset by operator"), T0 + 2)
    assert reset.state is State.HEALTHY
    assert reset.is_pristine()
    assert transition == Transition(1, State.DISABLED, State.HEALTHY, "reset by operator", T0 + 2, None)


def test_auth_failure_from_any_live_state() -> None:
    m = machine()
    cooling, _ = m.on_rate_limited(Health(1), T0, retry_after=5.0)
    disabled, transition = m.on_auth_failure(cooling, T0 + 1, 401)
    assert disabled.state is State.DISABLED
    assert transition is not None
    assert transition.from_state is State.COOLING


# --- circuit breaker ---------------------------------------------------------------------


def open_circuit(m: HealthMachine, now: float = T0) -> Health:
    health = Health(1)
    for i in range(3):
        health, _ = m.on_server_error(health, now + i * 0.1, "502")
    assert health.state is State.CIRCUIT_OPEN
    return health


def test_failures_below_the_threshold_change_no_state() -> None:
    m = machine()
    health, transition = m.on_server_error(Health(1), T0, "timeout")
    assert transition is None
    assert health.failures == 1
    health, transition = m.on_server_error(health, T0 + 1, "connect")
    assert transition is None
    assert health.failures == 2
    assert health.admission(T0 + 1) is Admission.ADMIT


def test_third_failure_in_the_window_opens_the_circuit() -> None:
    m = machine()
    health = Health(1)
    health, _ = m.on_server_error(health, T0, "500")
    health, _ = m.on_server_error(health, T0 + 1, "timeout")
    health, transition = m.on_server_error(health, T0 + 2, "connect")
    assert health.state is State.CIRCUIT_OPEN
    assert health.until == T0 + 2 + 5.0
    assert health.failures == 0
    assert health.opens == 1
    assert transition is not None
    assert "3 failures" in transition.reason
    assert "connect" in transition.reason
    assert health.admission(T0 + 6.9) is Admission.DENY
    assert health.admission(T0 + 7.0) is Admission.TRIAL
    assert health.usable(T0 + 7.0)


def test_failures_outside_the_window_start_a_new_count() -> None:
    m = machine(failure_window=30.0)
    health = Health(1)
    health, _ = m.on_server_error(health, T0, "500")
    health, _ = m.on_server_error(health, T0 + 10, "500")
    health, transition = m.on_server_error(health, T0 + 31, "500")
    assert transition is None
    assert health.failures == 1
    assert health.window_start == T0 + 31


def test_a_success_clears_the_failure_count() -> None:
    m = machine()
    health, _ = m.on_server_error(Health(1), T0, "500")
    health, _ = m.on_server_error(health, T0 + 1, "500")
    health, transition = m.on_success(health, T0 + 2)
    assert transition is None
    assert health.is_pristine()
    health, transition = m.on_server_error(health, T0 + 3, "500")
    assert transition is None


def test_a_success_on_a_clean_healthy_account_changes_nothing() -> None:
    m = machine()
    health = Health(1, since=T0, version=3)
    same, transition = m.on_success(health, T0 + 5)
    assert transition is None
    assert same is health  # nothing to clear: the record is kept as it is
    limited, _ = m.on_rate_limited(health, T0, retry_after=None)
    recovered, _ = m.on_success(limited, T0 + 3600)
    assert recovered.rate_limits == 0
    assert recovered.state is State.HEALTHY


def test_half_open_trial_success_closes_the_circuit() -> None:
    m = machine()
    health = open_circuit(m)
    assert m.on_success(health, T0 + 1) == (health, None)  # stale: sent before it opened
    closed, transition = m.on_success(health, T0 + 10)
    assert closed.state is State.HEALTHY
    assert closed.is_pristine()
    assert transition is not None
    assert (transition.from_state, transition.to_state, transition.reason) == (
        State.CIRCUIT_OPEN,
        State.HEALTHY,
        "trial request succeeded",
    )


def test_half_open_trial_failure_reopens_for_longer_up_to_the_cap() -> None:
    m = machine(open_base=5.0, open_factor=2.0, open_cap=30.0)
    health = open_circuit(m)
    assert m.on_server_error(health, T0 + 1, "500") == (health, None)  # stale while open
    intervals = []
    now = T0 + 10
    for _ in range(4):
        health, transition = m.on_server_error(health, now, "timeout")
        assert transition is not None
        assert (transition.from_state, transition.to_state) == (State.CIRCUIT_OPEN, State.CIRCUIT_OPEN)
        assert "trial request failed" in transition.reason
        assert health.until is not None
        intervals.append(health.until - now)
        now = health.until
    assert intervals == [10.0, 20.0, 30.0, 30.0]
    health, _ = m.on_success(health, now)
    assert health.opens == 0  # the next opening starts short again


def test_429_on_a_half_open_trial_means_reachable_but_limited() -> None:
    m = machine()
    health = open_circuit(m)
    cooling, transition = m.on_rate_limited(health, T0 + 10, retry_after=3.0)
    assert cooling.state is State.COOLING
    assert cooling.until == T0 + 13.0
    assert transition is not None
    assert transition.from_state is State.CIRCUIT_OPEN
    assert m.on_rate_limited(health, T0 + 1, retry_after=3.0) == (health, None)  # before the trial


def test_server_errors_while_cooling_are_stale_until_it_ends() -> None:
    m = machine()
    health, _ = m.on_rate_limited(Health(1), T0, retry_after=5.0)
    assert m.on_server_error(health, T0 + 1, "500") == (health, None)
    counted, _ = m.on_server_error(health, T0 + 6, "500")
    assert counted.failures == 1


def test_reset_of_a_healthy_account_records_nothing() -> None:
    m = machine()
    health, _ = m.on_server_error(Health(1), T0, "500")
    reset, transition = m.reset(health, T0 + 1, "x")
    assert transition is None
    assert reset.is_pristine()


def test_apply_dispatches_every_event() -> None:
    m = machine()
    assert m.apply(Health(1), RateLimited(quota_exhausted=True), T0).health.until == T0 + 3600
    assert m.apply(Health(1), AuthFailure(401), T0).health.state is State.DISABLED
    assert m.apply(Health(1), ServerError("500"), T0).health.failures == 1
    assert m.apply(Health(1), Success(), T0).transition is None


def test_wire_round_trip_including_a_redis_hash() -> None:
    health, _ = machine().on_rate_limited(Health(42, version=9), T0, retry_after=2.5)
    assert Health.from_wire(health.to_wire()) == health
    as_hash = {k.encode(): ("" if v is None else str(v)).encode() for k, v in health.to_wire().items()}
    assert Health.from_wire({k.decode(): v for k, v in as_hash.items()}) == health
    assert Health.from_wire({"account_id": "3", "state": "healthy", "until": ""}) == Health(3)


def test_policy_from_settings(settings: object) -> None:
    settings.GATEWAY_HEALTH_QUOTA_COOLDOWN = 120.0  # type: ignore[attr-defined]
    settings.GATEWAY_HEALTH_FAILURE_THRESHOLD = 5  # type: ignore[attr-defined]
    policy = HealthPolicy.from_settings()
    assert policy.quota_cooldown == 120.0
    assert policy.failure_threshold == 5
    assert policy.backoff_base == 1.0


# --- reading upstream answers ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),
        ("1.5s", 1.5),
        ("20ms", 0.02),
        ("1h2m3s", 3723.0),
        ("2", 2.0),
        ("0.25", 0.25),
        ("100us", 0.0001),
        ("", None),
        ("soon", None),
        ("5x", None),
        ("-1", None),
        ("1s junk", None),
        ("nan", None),
    ],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    result = parse_duration(text)
    if seconds is None:
        assert result is None
    else:
        assert result == pytest.approx(seconds)


def test_retry_after_seconds_forms() -> None:
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"Retry-After": "1.5"}) == 1.5  # plain dicts: any case
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after-ms": "bad", "retry-after": "9"}) == 9.0
    assert retry_after_seconds({"retry-after": "-1"}) is None
    assert retry_after_seconds({"retry-after": "whenever"}, now=T0) is None
    assert retry_after_seconds({}) is None
    assert retry_after_seconds(httpx.Headers({"Retry-After": "4"})) == 4.0


def test_retry_after_http_date() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert retry_after_seconds({"retry-after": date}, now=now.timestamp()) == pytest.approx(90.0)
    assert retry_after_seconds({"retry-after": date}) is None  # a date needs "now"
    past = format_datetime(now - timedelta(seconds=90), usegmt=True)
    assert retry_after_seconds({"retry-after": past}, now=now.timestamp()) == 0.0


def test_ratelimit_reset_picks_the_exhausted_limit() -> None:
    headers = {
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-reset-tokens": "6m0s",
        "x-ratelimit-remaining-requests": "10",
        "x-ratelimit-remaining-tokens": "0",
    }
    assert ratelimit_reset_seconds(headers) == 360.0
    headers["x-ratelimit-remaining-requests"] = "0"
    assert ratelimit_reset_seconds(headers) == 360.0  # both spent: the later reset
    assert ratelimit_reset_seconds({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "20ms"}) == 0.02
    assert ratelimit_reset_seconds({"x-ratelimit-remaining-tokens": "0"}) is None
    assert ratelimit_reset_seconds({"x-ratelimit-reset-tokens": "garbage"}) is None


def test_rate_limit_event_tells_quota_from_burst() -> None:
    quota = b'{"error":{"message":"Quota.","type":"insufficient_quota","code":"insufficient_quota"}}'
    burst = b'{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}'
    assert rate_limit_event({"retry-after": "2"}, quota) == RateLimited(2.0, None, True)
    assert rate_limit_event({"x-ratelimit-reset-requests": "2s"}, burst) == RateLimited(None, 2.0, False)
    assert rate_limit_event({}, b"not json") == RateLimited()
    assert error_code(b'{"error": "flat"}') == ("", "")


def test_event_for_status() -> None:
    assert event_for_status(200, {}) == Success()
    assert event_for_status(429, {"retry-after": "1"}) == RateLimited(1.0)
    assert event_for_status(401, {}, b'{"error":{"code":"invalid_api_key"}}') == AuthFailure(401, "invalid_api_key")
    assert event_for_status(403, {}) == AuthFailure(403)
    assert event_for_status(503, {}) == ServerError("503")
    assert event_for_status(408, {}) == ServerError("408")
    # Redirects are never followed: the account's base URL is wrong, like a server error.
    for status in (301, 302, 307, 308):
        assert event_for_status(status, {}) == ServerError(str(status))
    for status in (400, 404, 413, 422):
        assert event_for_status(status, {}) is None


def test_event_for_exception() -> None:
    assert event_for_exception(UpstreamConnectError("x")) == ServerError("connect")
    assert event_for_exception(UpstreamTimeout("x")) == ServerError("timeout")
    assert event_for_exception(UpstreamProtocolError("x")) == ServerError("protocol")
    assert event_for_exception(ValueError("x")) is None
