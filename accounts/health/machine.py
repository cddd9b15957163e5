"""The health state machine of one upstream account: pure, deterministic, no I/O.

Every function takes the current :class:`Health` record and ``now`` (epoch seconds:
deadlines are shared between replicas, so they are wall-clock times) and returns the
next record plus the :class:`Transition` to log, if any. Jitter comes from the
``random.Random`` given to :class:`HealthMachine`, so tests can pin it.

States and what they admit (:meth:`Health.admission`):

==============  ==============================================  =========================
state           meaning                                         admits
==============  ==============================================  =========================
HEALTHY         serving                                         every request
COOLING         rate limited until ``until``                    nothing before ``until``,
                                                                everything after
CIRCUIT_OPEN    failing (5xx, timeouts, connect errors)         nothing before ``until``;
                                                                after it one *trial*
                                                                (half-open)
DISABLED        the upstream refused the credential (401/403)   nothing; only a probe or
                                                                an operator re-admits
==============  ==============================================  =========================

An expired cooldown needs no event to end: COOLING with ``until <= now`` behaves as
HEALTHY, and the next success records the transition back. Events that arrive for a
state they cannot concern (a success from a request sent before the account started
cooling, a 5xx while disabled) change nothing: results of requests in flight when the
state changed are stale evidence. The half-open "exactly one trial" is enforced by the
store (a lock, see accounts/health/store.py); this module only says a trial is due.

A tenant's request is evidence, not a verdict (one tenant's odd requests must not take an
account away from every tenant): its 401/403 changes nothing here, and server errors that
reach the threshold open the circuit only when they came from requests of at least two
tenants. Otherwise :meth:`HealthMachine.wants_probe` says a probe should confirm
(accounts/health/probing.py): the probe's 401/403 disables the account, its server error
opens the circuit, its success clears the count. Events without a tenant (probes) are
verdicts.

Operator-disabled accounts (``UpstreamAccount.enabled = False``) never reach this
machine: they are not in the config snapshot at all.
"""

from __future__ import annotations

import enum
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple

import orjson


class State(enum.StrEnum):
    HEALTHY = "healthy"
    COOLING = "cooling"
    CIRCUIT_OPEN = "circuit_open"
    DISABLED = "disabled"


class Admission(enum.Enum):
    ADMIT = "admit"  # send requests
    TRIAL = "trial"  # half-open: one request may test the account (take the store's probe lock)
    DENY = "deny"


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Success:
    """The upstream served a request (any 2xx)."""


@dataclass(frozen=True, slots=True)
class RateLimited:
    """A 429. Durations are seconds from the event; see :func:`rate_limit_event`."""

    retry_after: float | None = None
    reset_hint: float | None = None
    quota_exhausted: bool = False


@dataclass(frozen=True, slots=True)
class AuthFailure:
    """A 401 or 403: the upstream refused the credential. ``code``: the upstream's error code.

    ``tenant``: the tenant whose request got it, None for a probe's answer (a verdict). A
    tenant's request is only evidence: it changes nothing here, and the caller asks for a
    probe (:meth:`HealthMachine.wants_probe`), whose own 401/403 disables the account.
    """

    status: int
    code: str = ""
    tenant: int | None = None


@dataclass(frozen=True, slots=True)
class ServerError:
    """A 5xx (``kind`` = the status), ``timeout``, ``connect`` or ``protocol`` failure.

    ``tenant``: the tenant whose request failed, None for a probe (see :class:`Health.blamed`).
    """

    kind: str
    tenant: int | None = None


@dataclass(frozen=True, slots=True)
class Reset:
    """Re-admission by an operator or a successful probe: back to HEALTHY, counters cleared."""

    reason: str


Event = Success | RateLimited | AuthFailure | ServerError | Reset


# --- records -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Health:
    """Everything known about one account's health. Immutable; the machine returns new ones."""

    account_id: int
    state: State = State.HEALTHY
    until: float | None = None  # COOLING: end of the cooldown; CIRCUIT_OPEN: when a trial is due
    reason: str = ""
    since: float = 0.0  # time of the last transition
    rate_limits: int = 0  # consecutive burst 429s since the last success (drives the backoff)
    failures: int = 0  # consecutive server errors in the current window
    window_start: float = 0.0  # time of the first of those failures
    opens: int = 0  # consecutive circuit openings since the last success
    # The tenant whose requests caused every failure of the window; -1: several tenants or
    # a probe. Failures of one tenant alone never open the circuit (a probe must confirm).
    blamed: int = 0
    version: int = 0  # ordering of shared writes (accounts/health/store.py); the machine keeps it

    def admission(self, now: float) -> Admission:
        state = self.state
        if state is State.HEALTHY:
            return Admission.ADMIT
        if state is State.COOLING:
            return Admission.ADMIT if self.until is None or now >= self.until else Admission.DENY
        if state is State.CIRCUIT_OPEN:
            return Admission.TRIAL if self.until is None or now >= self.until else Admission.DENY
        return Admission.DENY

    def usable(self, now: float) -> bool:
        """True when a request may go to the account now (half-open counts: a trial is due)."""
        return self.admission(now) is not Admission.DENY

    def effective_state(self, now: float) -> State:
        """The state as an operator should read it: an expired cooldown is HEALTHY."""
        if self.state is State.COOLING and (self.until is None or now >= self.until):
            return State.HEALTHY
        return self.state

    def is_pristine(self) -> bool:
        """HEALTHY with every counter at zero: nothing worth storing."""
        return self.state is State.HEALTHY and not (self.rate_limits or self.failures or self.opens)

    def to_wire(self) -> dict[str, Any]:
        """A flat JSON-able dict (the Redis hash fields and the pub/sub payload)."""
        return {
            "account_id": self.account_id,
            "state": self.state.value,
            "until": self.until,
            "reason": self.reason,
            "since": self.since,
            "rate_limits": self.rate_limits,
            "failures": self.failures,
            "window_start": self.window_start,
            "opens": self.opens,
            "blamed": self.blamed,
            "version": self.version,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Health:
        """Inverse of :meth:`to_wire`; also accepts a Redis hash (bytes keys and values)."""
        data = {(k.decode() if isinstance(k, bytes) else k): v for k, v in data.items()}

        def text(value: Any) -> str:
            return value.decode() if isinstance(value, bytes) else str(value)

        def number(name: str) -> float | None:
            value = data.get(name)
            if value is None or value in ("", b""):
                return None
            return float(text(value))

        return cls(
            account_id=int(number("account_id") or 0),
            state=State(text(data.get("state", "healthy"))),
            until=number("until"),
            reason=text(data.get("reason", "")),
            since=number("since") or 0.0,
            rate_limits=int(number("rate_limits") or 0),
            failures=int(number("failures") or 0),
            window_start=number("window_start") or 0.0,
            opens=int(number("opens") or 0),
            blamed=int(number("blamed") or 0),
            version=int(number("version") or 0),
        )


@dataclass(frozen=True, slots=True)
class Transition:
    """One recorded change of state (an ``AccountTransition`` row once written)."""

    account_id: int
    from_state: State
    to_state: State
    reason: str
    at: float
    until: float | None = None


class Step(NamedTuple):
    health: Health
    transition: Transition | None


# --- the machine -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """Tunables of the machine (seconds). ``from_settings`` reads ``GATEWAY_HEALTH_*``."""

    backoff_base: float = 1.0  # first burst-429 cooldown without a hint
    backoff_factor: float = 2.0  # growth per consecutive 429
    backoff_cap: float = 60.0
    jitter: float = 0.2  # backoff is multiplied by uniform(1 - jitter, 1 + jitter), then capped
    max_hint: float = 3600.0  # upstream hints are clamped to this
    quota_cooldown: float = 3600.0  # insufficient_quota
    failure_threshold: int = 3  # consecutive server errors that open the circuit...
    failure_window: float = 30.0  # ...counted from the first of them within this window
    open_base: float = 5.0  # first open interval; grows by open_factor per consecutive opening
    open_factor: float = 2.0
    open_cap: float = 300.0
    trial_ttl: float = 30.0  # how long a half-open trial holds the probe lock at most

    @classmethod
    def from_settings(cls) -> HealthPolicy:
        from django.conf import settings

        values: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            setting = getattr(settings, f"GATEWAY_HEALTH_{name.upper()}", None)
            if setting is not None:
                values[name] = setting
        return cls(**values)


class HealthMachine:
    """Applies events to :class:`Health` records under a :class:`HealthPolicy`."""

    def __init__(self, policy: HealthPolicy | None = None, rng: random.Random | None = None) -> None:
        self.policy = policy or HealthPolicy()
        self._rng = rng or random.Random()

    def apply(self, health: Health, event: Event, now: float) -> Step:
        if isinstance(event, Success):
            return self.on_success(health, now)
        if isinstance(event, RateLimited):
            return self.on_rate_limited(
                health, now, event.retry_after, event.reset_hint, quota_exhausted=event.quota_exhausted
            )
        if isinstance(event, AuthFailure):
            if event.tenant is not None:
                return Step(health, None)  # evidence only: a probe decides (wants_probe)
            return self.on_auth_failure(health, now, event.status, event.code)
        if isinstance(event, ServerError):
            return self.on_server_error(health, now, event.kind, event.tenant)
        return self.reset(health, now, event.reason)

    def wants_probe(self, health: Health, event: Event) -> bool:
        """True when ``event`` (a tenant request's, already applied to ``health``) needs a
        probe's confirmation: a 401/403, or server errors that reached the threshold but all
        came from one tenant's requests. A probe's own answer (``tenant`` None) never does."""
        if isinstance(event, AuthFailure):
            return event.tenant is not None and health.state is not State.DISABLED
        if isinstance(event, ServerError) and event.tenant is not None:
            return health.state is not State.CIRCUIT_OPEN and health.failures >= self.policy.failure_threshold
        return False

    def backoff(self, streak: int) -> float:
        """The jittered cooldown of the ``streak``-th consecutive burst 429 without a hint."""
        p = self.policy
        delay = min(p.backoff_cap, p.backoff_base * p.backoff_factor ** max(0, streak - 1))
        jittered = delay * (1.0 + p.jitter * (2.0 * self._rng.random() - 1.0))
        return min(p.backoff_cap, max(0.0, jittered))

    def open_interval(self, opens: int) -> float:
        """How long the ``opens``-th consecutive opening keeps the circuit open."""
        p = self.policy
        return min(p.open_cap, p.open_base * p.open_factor ** max(0, opens - 1))

    def on_success(self, health: Health, now: float) -> Step:
        if health.state is State.HEALTHY and not (
            health.rate_limits or health.failures or health.window_start or health.opens or health.blamed
        ):
            return Step(health, None)  # the common case: nothing to clear (no dataclass copy)
        admission = health.admission(now)
        if admission is Admission.DENY:
            return Step(health, None)  # stale: sent before the account was taken out
        cleared = replace(health, rate_limits=0, failures=0, window_start=0.0, opens=0, blamed=0)
        if health.state is State.HEALTHY:
            return Step(cleared, None)
        reason = "trial request succeeded" if health.state is State.CIRCUIT_OPEN else "request succeeded after cooldown"
        return _move(cleared, State.HEALTHY, None, reason, now)

    def on_rate_limited(
        self,
        health: Health,
        now: float,
        retry_after: float | None = None,
        reset_hint: float | None = None,
        *,
        quota_exhausted: bool = False,
    ) -> Step:
        p = self.policy
        hint = retry_after if retry_after is not None else reset_hint
        if hint is not None:
            hint = min(p.max_hint, max(0.0, hint))
        admission = health.admission(now)
        if health.state is State.DISABLED or (health.state is State.CIRCUIT_OPEN and admission is Admission.DENY):
            return Step(health, None)
        if health.state is State.COOLING and admission is Admission.DENY:
            # Another request of the same burst: extend to a later hint, never grow the backoff.
            if quota_exhausted and not health.reason.startswith(_QUOTA_REASON):
                until = now + max(p.quota_cooldown, hint or 0.0)
                return _move(health, State.COOLING, max(until, health.until or 0.0), _quota_reason(until - now), now)
            if hint is not None and health.until is not None and now + hint > health.until:
                return Step(replace(health, until=now + hint), None)
            return Step(health, None)
        # HEALTHY, an expired cooldown, or a half-open trial answered 429 (reachable, just limited).
        if quota_exhausted:
            seconds = max(p.quota_cooldown, hint or 0.0)
            return _move(health, State.COOLING, now + seconds, _quota_reason(seconds), now)
        streak = health.rate_limits + 1
        if retry_after is not None:
            seconds, why = hint or 0.0, f"retry-after {_fmt(hint or 0.0)}"
        elif reset_hint is not None:
            seconds, why = hint or 0.0, f"x-ratelimit-reset {_fmt(hint or 0.0)}"
        else:
            seconds = self.backoff(streak)
            why = f"no hint, backoff {_fmt(seconds)} (429 #{streak} in a row)"
        cooled = replace(health, rate_limits=streak, opens=0, failures=0, window_start=0.0, blamed=0)
        return _move(cooled, State.COOLING, now + seconds, f"rate limited (429): {why}", now)

    def on_auth_failure(self, health: Health, now: float, status: int, code: str = "") -> Step:
        if health.state is State.DISABLED:
            return Step(health, None)
        # Only the status and the error code: upstream messages may echo part of the key.
        detail = f" ({code})" if code else ""
        what = "credential rejected" if status == 401 else "access forbidden"
        reason = f"upstream answered {status}{detail}: {what}"
        return _move(health, State.DISABLED, None, reason, now)

    def on_server_error(self, health: Health, now: float, kind: str, tenant: int | None = None) -> Step:
        p = self.policy
        admission = health.admission(now)
        if admission is Admission.DENY:
            return Step(health, None)  # disabled, cooling or open: stale evidence
        if health.state is State.CIRCUIT_OPEN:  # the half-open trial failed
            opens = health.opens + 1
            seconds = self.open_interval(opens)
            reason = f"trial request failed ({kind}): circuit open for {_fmt(seconds)}"
            return _move(replace(health, opens=opens), State.CIRCUIT_OPEN, now + seconds, reason, now)
        source = -1 if tenant is None else tenant
        if health.failures and now - health.window_start <= p.failure_window:
            failures, window_start = health.failures + 1, health.window_start
            blamed = health.blamed if health.blamed == source else -1
        else:
            failures, window_start, blamed = 1, now, source
        if failures < p.failure_threshold or blamed != -1:
            # Below the threshold, or every failure came from one tenant's requests: that
            # tenant's requests may be what fails (the caller asks a probe to confirm).
            return Step(replace(health, failures=failures, window_start=window_start, blamed=blamed), None)
        opens = health.opens + 1
        seconds = self.open_interval(opens)
        reason = f"{failures} failures in {_fmt(now - window_start)} (last: {kind}): circuit open for {_fmt(seconds)}"
        opened = replace(health, failures=0, window_start=0.0, opens=opens, blamed=0)
        return _move(opened, State.CIRCUIT_OPEN, now + seconds, reason, now)

    def reset(self, health: Health, now: float, reason: str) -> Step:
        if health.state is State.HEALTHY:
            return Step(Health(health.account_id, since=health.since, version=health.version), None)
        fresh = Health(health.account_id, reason=reason, since=now, version=health.version)
        return Step(fresh, Transition(health.account_id, health.state, State.HEALTHY, reason, now, None))


def _move(health: Health, to: State, until: float | None, reason: str, now: float) -> Step:
    moved = replace(health, state=to, until=until, reason=reason, since=now)
    return Step(moved, Transition(health.account_id, health.state, to, reason, now, until))


_QUOTA_REASON = "quota exhausted (insufficient_quota)"


def _quota_reason(seconds: float) -> str:
    return f"{_QUOTA_REASON}: cooling down {_fmt(seconds)}"


def _fmt(seconds: float) -> str:
    if seconds >= 60:
        return f"{seconds / 60:.1f}min"
    return f"{seconds:.3g}s"


# --- reading upstream answers ------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: str) -> float | None:
    """Seconds in a Go-style duration (``6m0s``, ``1.5s``, ``20ms``, ``1h2m``) or a bare number.

    None when ``value`` is not one (never raises: headers come from the upstream).
    """
    text = value.strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return number if math.isfinite(number) and number >= 0 else None
    total, pos = 0.0, 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos > 0 else None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None and not hasattr(headers, "multi_items"):  # a plain dict: any case
        for key, item in headers.items():
            if key.lower() == name:
                return item
    return value


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the upstream asks us to wait: ``retry-after-ms``, else ``retry-after``.

    ``retry-after`` may be seconds or an HTTP date (then ``now``, epoch seconds, is
    required; without it a date is ignored). Negative or unparsable values: None.
    Header names are matched case-insensitively.
    """
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = -1.0
        if math.isfinite(value) and value >= 0:
            return value
    raw = _header(headers, "retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
    except ValueError:
        if now is None:
            return None
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - now)
    return value if math.isfinite(value) and value >= 0 else None


def ratelimit_reset_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds until the exhausted limit resets, from ``x-ratelimit-reset-requests|tokens``.

    When ``x-ratelimit-remaining-*`` says which limit is spent (``0``), the latest reset
    among the spent ones; otherwise the earliest reset given (the 429 concerns one of
    them, and a repeat 429 will tell). None without any usable reset header.
    """
    resets: dict[str, float] = {}
    spent: list[str] = []
    for kind in ("requests", "tokens"):
        raw = _header(headers, f"x-ratelimit-reset-{kind}")
        value = parse_duration(raw) if raw is not None else None
        if value is not None:
            resets[kind] = value
        remaining = _header(headers, f"x-ratelimit-remaining-{kind}")
        if remaining is not None and remaining.strip() == "0":
            spent.append(kind)
    if not resets:
        return None
    spent_resets = [resets[kind] for kind in spent if kind in resets]
    return max(spent_resets) if spent_resets else min(resets.values())


def error_code(body: bytes) -> tuple[str, str]:
    """``(error.code, error.type)`` of an OpenAI error envelope; empty strings if absent."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", ""
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return "", ""
    code, type_ = error.get("code"), error.get("type")
    return (code if isinstance(code, str) else ""), (type_ if isinstance(type_, str) else "")


def rate_limit_event(headers: Mapping[str, str], body: bytes = b"", now: float | None = None) -> RateLimited:
    """The :class:`RateLimited` event of a 429 answer (``now``: for HTTP-date Retry-After)."""
    code, type_ = error_code(body) if body else ("", "")
    return RateLimited(
        retry_after=retry_after_seconds(headers, now),
        reset_hint=ratelimit_reset_seconds(headers),
        quota_exhausted="insufficient_quota" in (code, type_),
    )


def event_for_status(
    status: int, headers: Mapping[str, str], body: bytes = b"", now: float | None = None
) -> Event | None:
    """What an upstream answer says about the account's health; None if nothing.

    2xx: success. 429: rate limited (burst or quota). 401/403: auth failure. 408, 5xx
    and 3xx (redirects are never followed: a moved or misconfigured base URL) and 1xx:
    server error. Other 4xx are the request's fault, not the account's.
    """
    if 200 <= status < 300:
        return Success()
    if status < 200 or 300 <= status < 400:
        return ServerError(str(status))
    if status == 429:
        return rate_limit_event(headers, body, now)
    if status in (401, 403):
        return AuthFailure(status, error_code(body)[0] if body else "")
    if status >= 500 or status == 408:
        return ServerError(str(status))
    return None


def event_for_exception(exc: BaseException) -> Event | None:
    """The :class:`ServerError` of a accounts.upstream.client failure; None for anything else."""
    from accounts.upstream.client import UpstreamConnectError, UpstreamError, UpstreamTimeout

    if isinstance(exc, UpstreamConnectError):
        return ServerError("connect")
    if isinstance(exc, UpstreamTimeout):
        return ServerError("timeout")
    if isinstance(exc, UpstreamError):
        return ServerError("protocol")
    return None
