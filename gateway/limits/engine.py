"""Rate limits, concurrency limits and budgets: the engine behind the data plane's choke point.

The caller describes each set of limits that applies to a request as a :class:`Scope`
(the key's, the tenant's), asks :meth:`Limiter.admit` once per request, and hands the
returned :class:`Ticket` back to :meth:`Limiter.settle` exactly once when the response
ended (or failed). Two backends share these semantics: :class:`LocalLimiter` (one
process, in memory) and ``gateway.limits.redis_backend.RedisLimiter`` (replicas share Redis).

Contract:

- **Atomic admission.** Every limit of every scope is checked and, only if all pass,
  counted, with nothing in between. A refused admit counts nothing.
- **rpm / tpm**: fixed one-minute windows aligned to the epoch minute (``now // 60``).
  A request counts one at admit and is not given back by settle (a failed request was
  still a request). Tokens count the caller's estimate at admit; settle corrects the
  admitting minute by ``actual - estimate`` (usage counts in the minute its request
  was admitted). A request is refused when ``used + 1 > rpm`` or ``used + estimate > tpm``.
- **concurrency**: a lease per admitted request, released by settle. A lease expires
  after ``lease_ttl`` seconds (default 15 min), so a crashed replica cannot hold slots
  forever; a request running longer than that stops counting.
- **budgets**: per scope and window (``window_start``/``window_end``, computed by the
  caller), money in integer micro-USD and tokens. Admit refuses when
  ``spent + reserved + estimate > limit`` for either unit, else reserves the estimate;
  settle does ``reserved -= estimate; spent += actual``. With actual usage at most the
  estimate, concurrent requests can never overshoot; an underestimate overshoots by at
  most what the in-flight requests underestimated. A replica that dies between admit
  and settle leaves its reservation in place until the window ends (conservative).
- **unknown usage** (``settle(tokens=None)`` / ``micros=None``): the estimate is kept
  as spent. A refund is ``settle(ticket, tokens=0, micros=0)``; :meth:`Limiter.cancel`
  additionally gives the request back to rpm (for a request that never happened, e.g.
  one admitted under a snapshot that turned out stale). Settling twice is a no-op.
- **alerts**: ``on_alert(scope, kind, spent_tokens, spent_micros, window_start)`` is
  called at most once per scope, window and kind: ``"soft"`` when settled spend reaches
  ``soft_percent`` of a limit, ``"hard"`` when it reaches the limit or when a request
  is first refused for the budget. It runs on the event loop: it must not block (queue
  the work). After a Redis restart the "already alerted" marks are gone with the rest.
- **seeding**: a budget counter that does not exist yet (first use of a window, a
  fresh process, a Redis restart) is initialised from ``await seed(scope)`` (what the
  database says was spent in the window), run once per process and window however many
  requests race for it. While the seed fails the scope's budget is not enforced (fail
  open, logged) and the seed is retried after ``seed_retry`` seconds.
- **headers** (``Decision.headers``, for every response of an admitted or refused
  request): ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` of the scope with
  the least remaining; a trio is left out when no scope limits that dimension. Resets
  are durations written like OpenAI's (Go's): ``"6ms"``, ``"1s"``, ``"59.2s"``,
  ``"1m0s"``, ``"1h2m3s"``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import Protocol

from gateway.contract.errors import RATE_LIMIT, GatewayError

logger = logging.getLogger(__name__)

MINUTE = 60
# A lease outlives any sane request; past it, a crashed replica's slot comes back.
LEASE_TTL = 900.0
# Budget counters live this long past their window, for settlements of requests that
# straddle the window's end.
BUDGET_GRACE = 3600
# After a failed seed, the scope's budget is not enforced for this long before retrying.
SEED_RETRY = 5.0
# Waiting behind a concurrency limit: no better guess than "soon".
CONCURRENCY_RETRY = 1.0

# Kinds of checks, as the Redis script reports them too.
RPM, TPM, CONCURRENCY, BUDGET = 0, 1, 2, 3
_KIND_NAMES = ("rpm", "tpm", "concurrency", "budget")

Seed = Callable[["Scope"], Awaitable[tuple[int, int]]]
"""``await seed(scope)`` -> (tokens, micros) already spent in ``scope``'s budget window."""

AlertHook = Callable[["Scope", str, int, int, int], object]
"""``on_alert(scope, kind, spent_tokens, spent_micros, window_start)``; kind: "soft" | "hard"."""

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of limits (a key's or a tenant's). ``None`` means unlimited.

    ``name`` prefixes the error param ("key" -> "key.rpm"); (name, id) identifies the
    counters, so two scopes with the same name and id share them.
    """

    name: str
    id: int
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    budget_tokens: int | None = None
    budget_micros: int | None = None  # money, integer micro-USD
    window_start: int = 0  # budget window [start, end), epoch seconds
    window_end: int = 0
    soft_percent: int | None = None
    tenant_id: int | None = None  # not used by the engine: for the alert hook's benefit

    @property
    def has_budget(self) -> bool:
        return self.budget_tokens is not None or self.budget_micros is not None


@dataclass(slots=True)
class Ticket:
    """What an admit counted; hand it to settle (or cancel) exactly once. Opaque to callers."""

    scopes: tuple[Scope, ...]
    tokens: int  # the estimates reserved
    micros: int
    minute: int  # the epoch minute rpm/tpm were counted in
    lease: str  # the concurrency lease ("" when no scope limits concurrency)
    budgeted: tuple[bool, ...]  # per scope: whether its budget reserved the estimate
    settled: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of an admit. ``headers`` go on the response, whatever it is."""

    allowed: bool
    exceeded: str | None = None  # "key.rpm", "tenant.tpm", "key.concurrency", "tenant.budget"
    retry_after: float | None = None  # seconds
    headers: Headers = field(default_factory=list)
    ticket: Ticket | None = None  # set when allowed
    config_token: object = None  # the config change token, read with the decision
    message: str = ""
    reads: tuple[object, ...] = ()  # Redis backend: the values of the keys read along (None: missing)

    @property
    def code(self) -> str | None:
        """The error code of a refusal: ``budget_exceeded`` or ``rate_limit_exceeded``."""
        if self.exceeded is None:
            return None
        return "budget_exceeded" if self.exceeded.endswith(".budget") else "rate_limit_exceeded"


class Limiter(Protocol):
    async def admit(
        self, scopes: Sequence[Scope], *, tokens: int, micros: int = 0, now: float | None = None
    ) -> Decision:
        """Check and count every limit of ``scopes`` atomically (see the module docstring)."""
        ...

    def settle(self, ticket: Ticket, *, tokens: int | None, micros: int | None) -> None:
        """Record the actual usage (None: unknown, the estimate counts). Never raises; idempotent."""
        ...

    def cancel(self, ticket: Ticket) -> None:
        """Undo an admit entirely: refund, release, and give the request back to rpm."""
        ...

    async def flush(self) -> None:
        """Apply every queued settlement now."""
        ...

    async def aclose(self) -> None:
        """Flush and stop background work."""
        ...


def rejection_error(decision: Decision) -> GatewayError:
    """The 429 of a refused decision: OpenAI envelope, Retry-After and the rate-limit headers."""
    retry = decision.retry_after or 0.0
    headers = [
        *decision.headers,
        (b"retry-after", b"%d" % max(1, math.ceil(retry))),
        (b"retry-after-ms", b"%d" % max(1, math.ceil(retry * 1000))),
    ]
    return GatewayError(
        429,
        decision.message or "Rate limit reached. Please try again later.",
        type="insufficient_quota" if decision.code == "budget_exceeded" else RATE_LIMIT,
        code=decision.code,
        param=decision.exceeded,
        headers=headers,
    )


def estimate_tokens(body_bytes: int, max_output_tokens: int | None, *, default_output: int = 4096) -> int:
    """A reservation estimate: ~4 bytes per input token, plus the output cap (or a default)."""
    output = max_output_tokens if max_output_tokens is not None and max_output_tokens >= 0 else default_output
    return body_bytes // 4 + 1 + output


def format_duration(seconds: float) -> str:
    """A duration as OpenAI's rate-limit headers write it: "6ms", "1s", "59.2s", "1m0s", "1h2m3s"."""
    ms = max(0, round(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    secs = f"{rest // 1000}" if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    if minutes == 0:
        return f"{secs}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


def threshold(limit: int | None, percent: int | None) -> int:
    """The smallest spend that reaches ``percent`` of ``limit``; -1 when there is none."""
    if limit is None or percent is None:
        return -1
    return -(-limit * percent // 100)


def rate_headers(scopes: Sequence[Scope], requests: Sequence[int], tokens: Sequence[int], now: float) -> Headers:
    """x-ratelimit-* of the most constrained scope; ``requests``/``tokens``: used per scope."""
    best_r: tuple[int, int] | None = None  # (remaining, limit)
    best_t: tuple[int, int] | None = None
    for i, scope in enumerate(scopes):
        limit = scope.rpm
        if limit is not None and (best_r is None or limit - requests[i] < best_r[0]):
            best_r = (limit - requests[i], limit)
        limit = scope.tpm
        if limit is not None and (best_t is None or limit - tokens[i] < best_t[0]):
            best_t = (limit - tokens[i], limit)
    if best_r is None and best_t is None:
        return []
    reset = _reset_bytes(round(((now // MINUTE + 1) * MINUTE - now) * 1000))
    headers: Headers = []
    if best_r is not None:
        headers.append((b"x-ratelimit-limit-requests", b"%d" % best_r[1]))
        headers.append((b"x-ratelimit-remaining-requests", b"%d" % max(0, best_r[0])))
        headers.append((b"x-ratelimit-reset-requests", reset))
    if best_t is not None:
        headers.append((b"x-ratelimit-limit-tokens", b"%d" % best_t[1]))
        headers.append((b"x-ratelimit-remaining-tokens", b"%d" % max(0, best_t[0])))
        headers.append((b"x-ratelimit-reset-tokens", reset))
    return headers


@functools.lru_cache(maxsize=4096)
def _reset_bytes(ms: int) -> bytes:
    return format_duration(ms / 1000).encode()


def refusal(
    scopes: Sequence[Scope],
    fails: Sequence[tuple[int, int]],
    requests: Sequence[int],
    tokens: Sequence[int],
    estimate: int,
    now: float,
) -> tuple[str, float, str]:
    """(exceeded, retry_after, message) for failed checks ``(scope index, kind)``.

    When several limits are exceeded, the one that lasts longest is named: retrying
    earlier would only meet it.
    """
    chosen: tuple[str, float, str] | None = None
    minute_left = (now // MINUTE + 1) * MINUTE - now
    for index, kind in fails:
        scope = scopes[index]
        param = f"{scope.name}.{_KIND_NAMES[kind]}"
        if kind == RPM:
            retry = minute_left
            message = (
                f"Rate limit reached for {param} (requests per minute): limit {scope.rpm}, "
                f"used {requests[index]}. Please try again in {format_duration(retry)}."
            )
        elif kind == TPM:
            retry = minute_left
            message = (
                f"Rate limit reached for {param} (tokens per minute): limit {scope.tpm}, "
                f"used {tokens[index]}, requested {estimate}. Please try again in {format_duration(retry)}."
            )
        elif kind == CONCURRENCY:
            retry = CONCURRENCY_RETRY
            message = (
                f"Too many concurrent requests for {param}: limit {scope.concurrency}. "
                "Please try again when a request has finished."
            )
        else:
            retry = max(1.0, scope.window_end - now)
            message = (
                f"The {scope.name} budget of the current window is exhausted ({param}); "
                f"it renews in {format_duration(retry)}."
            )
        if chosen is None or retry > chosen[1]:
            chosen = (param, retry, message)
    assert chosen is not None
    return chosen


def fire_alert(hook: AlertHook | None, scope: Scope, kind: str, spent_tokens: int, spent_micros: int) -> None:
    """Call the alert hook; its failure is logged, never raised into a request."""
    if hook is None:
        return
    try:
        hook(scope, kind, spent_tokens, spent_micros, scope.window_start)
    except Exception:
        logger.exception("budget alert hook failed (%s %s.%d)", kind, scope.name, scope.id)


_lease_ids = count(1)
_LEASE_PREFIX = f"{os.getpid():x}.{os.urandom(4).hex()}."


def new_lease_id() -> str:
    """Unique across processes (random per process) and within one (a counter)."""
    return _LEASE_PREFIX + str(next(_lease_ids))


class Seeder:
    """Runs the seed hook once per (scope, window) for all the admits that race for it.

    An admit that saw the counter missing at monotonic time ``since`` reuses a seed
    that completed after ``since`` (it raced the admit that wrote it) instead of
    querying again; a counter lost later (Redis restart) is seeded afresh. A failure
    is remembered for ``retry`` seconds.
    """

    # Completed seeds are kept this long for racing admits (which are quicker than this).
    KEEP = 60.0

    def __init__(self, seed: Seed | None, retry: float = SEED_RETRY) -> None:
        self.seed = seed
        self._retry = retry
        self._inflight: dict[tuple[str, int, int], asyncio.Task[tuple[int, int] | None]] = {}
        self._failed: dict[tuple[str, int, int], float] = {}
        self._recent: dict[tuple[str, int, int], tuple[float, tuple[int, int]]] = {}

    async def get(self, scope: Scope, since: float | None = None) -> tuple[int, int] | None:
        """(tokens, micros) spent so far in the scope's window; None while the seed fails."""
        if self.seed is None:
            return (0, 0)
        key = (scope.name, scope.id, scope.window_start)
        recent = self._recent.get(key)
        if recent is not None and since is not None and recent[0] >= since:
            return recent[1]
        until = self._failed.get(key)
        if until is not None:
            if time.monotonic() < until:
                return None
            del self._failed[key]
        task = self._inflight.get(key)
        if task is None:
            # A task rather than a plain await: a waiter that is cancelled (its client
            # went away) must not cancel the seed that the others wait for.
            task = asyncio.get_running_loop().create_task(self._run(key, self.seed, scope))
            self._inflight[key] = task
        return await asyncio.shield(task)

    async def _run(self, key: tuple[str, int, int], seed: Seed, scope: Scope) -> tuple[int, int] | None:
        try:
            tokens, micros = await seed(scope)
            now = time.monotonic()
            # Kept in completion order (re-inserted below), so the stale ones are at the front:
            # many keys seen at once (a restart under load) must not make each seed O(n).
            while self._recent:
                oldest = next(iter(self._recent))
                if self._recent[oldest][0] >= now - self.KEEP:
                    break
                del self._recent[oldest]
            result = (int(tokens), int(micros))
            self._recent.pop(key, None)
            self._recent[key] = (now, result)
            return result
        except Exception:
            logger.exception(
                "budget seed failed for %s.%d; its budget is not enforced for %.0fs", scope.name, scope.id, self._retry
            )
            self._failed[key] = time.monotonic() + self._retry
            return None
        finally:
            del self._inflight[key]


class _Minute:
    __slots__ = ("minute", "requests", "tokens")

    def __init__(self, minute: int) -> None:
        self.minute = minute
        self.requests = 0
        self.tokens = 0


class _Budget:
    __slots__ = (
        "hard_alerted",
        "reserved_micros",
        "reserved_tokens",
        "soft_alerted",
        "spent_micros",
        "spent_tokens",
        "window_end",
        "window_start",
    )

    def __init__(self, window_start: int, window_end: int, spent_tokens: int, spent_micros: int) -> None:
        self.window_start = window_start
        self.window_end = window_end
        self.spent_tokens = spent_tokens
        self.spent_micros = spent_micros
        self.reserved_tokens = 0
        self.reserved_micros = 0
        self.soft_alerted = False
        self.hard_alerted = False

    def refuses(self, scope: Scope, tokens: int, micros: int) -> bool:
        return (
            scope.budget_tokens is not None and self.spent_tokens + self.reserved_tokens + tokens > scope.budget_tokens
        ) or (
            scope.budget_micros is not None and self.spent_micros + self.reserved_micros + micros > scope.budget_micros
        )


class LocalLimiter:
    """The in-process backend: one event loop's dicts, O(1) per scope and request.

    Each admit checks and counts without an ``await`` in between, so the admits of one
    event loop are atomic (use it from that loop only). State is one entry per scope
    and kind: a new minute or budget window replaces the old one, and a sweep once a
    minute drops what went idle, so memory follows the number of active scopes, not the
    number of windows. ``token_source`` (e.g. ``gateway.config.notify.file_token``) fills
    ``Decision.config_token``.
    """

    def __init__(
        self,
        *,
        seed: Seed | None = None,
        on_alert: AlertHook | None = None,
        lease_ttl: float = LEASE_TTL,
        token_source: Callable[[], object] | None = None,
        seed_retry: float = SEED_RETRY,
        budget_grace: int = BUDGET_GRACE,
    ) -> None:
        self._seeder = Seeder(seed, seed_retry)
        self._on_alert = on_alert
        self._lease_ttl = lease_ttl
        self._token_source = token_source
        self._budget_grace = budget_grace
        self._minutes: dict[tuple[str, int], _Minute] = {}
        self._leases: dict[tuple[str, int], dict[str, float]] = {}
        self._budgets: dict[tuple[str, int], _Budget] = {}
        self._next_sweep = 0.0

    def state_size(self) -> int:
        """How many counters and leases are held (for tests and metrics)."""
        return len(self._minutes) + len(self._budgets) + sum(len(v) + 1 for v in self._leases.values())

    async def admit(
        self, scopes: Sequence[Scope], *, tokens: int, micros: int = 0, now: float | None = None
    ) -> Decision:
        now = time.time() if now is None else now
        for scope in scopes:
            if scope.has_budget and self._current_budget(scope) is None:
                await self._seed_budget(scope)
        # From here on no await: the check and the count are one atomic step.
        budgets = [self._current_budget(scope) if scope.has_budget else None for scope in scopes]
        token = self._token_source() if self._token_source is not None else None
        if now >= self._next_sweep:
            self._sweep(now)
        minute = int(now // MINUTE)
        used_r = [0] * len(scopes)
        used_t = [0] * len(scopes)
        counters: list[_Minute | None] = []
        fails: list[tuple[int, int]] = []
        for i, scope in enumerate(scopes):
            key = (scope.name, scope.id)
            counter = None
            if scope.rpm is not None or scope.tpm is not None:
                counter = self._minutes.get(key)
                if counter is None or counter.minute != minute:
                    counter = self._minutes[key] = _Minute(minute)
                used_r[i], used_t[i] = counter.requests, counter.tokens
                if scope.rpm is not None and counter.requests + 1 > scope.rpm:
                    fails.append((i, RPM))
                if scope.tpm is not None and counter.tokens + tokens > scope.tpm:
                    fails.append((i, TPM))
            counters.append(counter)
            if scope.concurrency is not None:
                leases = self._leases.get(key)
                held = len(leases) if leases is not None else 0
                if leases is not None and held >= scope.concurrency:
                    _expire_leases(leases, now)
                    held = len(leases)
                if held >= scope.concurrency:
                    fails.append((i, CONCURRENCY))
            budget = budgets[i]
            if budget is not None and budget.refuses(scope, tokens, micros):
                fails.append((i, BUDGET))
                if not budget.hard_alerted:
                    budget.hard_alerted = True
                    fire_alert(self._on_alert, scope, "hard", budget.spent_tokens, budget.spent_micros)
        if fails:
            exceeded, retry, message = refusal(scopes, fails, used_r, used_t, tokens, now)
            headers = rate_headers(scopes, used_r, used_t, now)
            return Decision(False, exceeded, retry, headers, None, token, message)
        lease = ""
        for i, scope in enumerate(scopes):
            counter = counters[i]
            if counter is not None:
                counter.requests += 1
                counter.tokens += tokens
                used_r[i] += 1
                used_t[i] += tokens
            if scope.concurrency is not None:
                lease = lease or new_lease_id()
                self._leases.setdefault((scope.name, scope.id), {})[lease] = now + self._lease_ttl
            budget = budgets[i]
            if budget is not None:
                budget.reserved_tokens += tokens
                budget.reserved_micros += micros
        ticket = Ticket(tuple(scopes), tokens, micros, minute, lease, tuple(b is not None for b in budgets))
        return Decision(True, None, None, rate_headers(scopes, used_r, used_t, now), ticket, token)

    async def peek(self, scopes: Sequence[Scope], *, now: float | None = None) -> list[dict[str, object]]:
        """Each scope's limits and what is left of them now (counts nothing).

        A budget without a counter yet reports what the seed says was spent.
        """
        now = time.time() if now is None else now
        minute = int(now // MINUTE)
        reports = []
        for scope in scopes:
            key = (scope.name, scope.id)
            counter = self._minutes.get(key)
            current = counter is not None and counter.minute == minute
            leases = self._leases.get(key) or {}
            budget = self._current_budget(scope) if scope.has_budget else None
            spent = (budget.spent_tokens, budget.spent_micros) if budget is not None else None
            if scope.has_budget and spent is None:
                spent = await self._seeder.get(scope)  # no counter yet (e.g. a fresh process)
            reports.append(
                limit_report(
                    scope,
                    now,
                    requests=counter.requests if counter is not None and current else 0,
                    tokens=counter.tokens if counter is not None and current else 0,
                    in_flight=sum(1 for expiry in leases.values() if expiry > now),
                    spent_tokens=spent[0] if spent is not None else None,
                    spent_micros=spent[1] if spent is not None else None,
                )
            )
        return reports

    def _current_budget(self, scope: Scope) -> _Budget | None:
        """The counter of the scope's window; None when it does not exist (yet)."""
        budget = self._budgets.get((scope.name, scope.id))
        return budget if budget is not None and budget.window_start == scope.window_start else None

    async def _seed_budget(self, scope: Scope) -> None:
        """Create the counter of the scope's window from the seed, unless a newer window took over."""
        key = (scope.name, scope.id)
        budget = self._budgets.get(key)
        if budget is not None and budget.window_start > scope.window_start:
            return  # this request computed an older window than another one did
        seeded = await self._seeder.get(scope)
        budget = self._budgets.get(key)  # another admit may have created it meanwhile
        if seeded is None or (budget is not None and budget.window_start >= scope.window_start):
            return
        self._budgets[key] = _Budget(scope.window_start, scope.window_end, *seeded)

    def settle(self, ticket: Ticket, *, tokens: int | None, micros: int | None) -> None:
        self._settle(ticket, tokens, micros, requests=0)

    def cancel(self, ticket: Ticket) -> None:
        self._settle(ticket, 0, 0, requests=-1)

    def _settle(self, ticket: Ticket, tokens: int | None, micros: int | None, *, requests: int) -> None:
        if ticket.settled:
            return
        ticket.settled = True
        actual_t = ticket.tokens if tokens is None else tokens
        actual_m = ticket.micros if micros is None else micros
        for i, scope in enumerate(ticket.scopes):
            key = (scope.name, scope.id)
            if scope.rpm is not None or scope.tpm is not None:
                counter = self._minutes.get(key)
                if counter is not None and counter.minute == ticket.minute:
                    counter.requests = max(0, counter.requests + requests)
                    counter.tokens = max(0, counter.tokens + actual_t - ticket.tokens)
            if ticket.lease and scope.concurrency is not None:
                leases = self._leases.get(key)
                if leases is not None:
                    leases.pop(ticket.lease, None)
                    if not leases:
                        del self._leases[key]
            if not ticket.budgeted[i]:
                continue
            budget = self._current_budget(scope)
            if budget is None:
                continue  # the window is over and its counter gone
            budget.reserved_tokens = max(0, budget.reserved_tokens - ticket.tokens)
            budget.reserved_micros = max(0, budget.reserved_micros - ticket.micros)
            budget.spent_tokens += actual_t
            budget.spent_micros += actual_m
            self._check_alerts(scope, budget)

    def _check_alerts(self, scope: Scope, budget: _Budget) -> None:
        st, sm = budget.spent_tokens, budget.spent_micros
        if not budget.soft_alerted and reached(scope, st, sm, scope.soft_percent):
            budget.soft_alerted = True
            fire_alert(self._on_alert, scope, "soft", st, sm)
        if not budget.hard_alerted and reached(scope, st, sm, 100):
            budget.hard_alerted = True
            fire_alert(self._on_alert, scope, "hard", st, sm)

    def _sweep(self, now: float) -> None:
        """Drop counters that no request can use any more (once a minute, O(state))."""
        self._next_sweep = now + MINUTE
        minute = int(now // MINUTE)
        for key in [k for k, c in self._minutes.items() if c.minute < minute]:
            del self._minutes[key]
        for key in [k for k, b in self._budgets.items() if b.window_end + self._budget_grace < now]:
            del self._budgets[key]
        for key, leases in list(self._leases.items()):
            _expire_leases(leases, now)
            if not leases:
                del self._leases[key]

    async def flush(self) -> None:
        return None  # settlements apply at once

    async def aclose(self) -> None:
        return None


def _expire_leases(leases: dict[str, float], now: float) -> None:
    for lease in [lease for lease, expiry in leases.items() if expiry <= now]:
        del leases[lease]


def reached(scope: Scope, spent_tokens: int, spent_micros: int, percent: int | None) -> bool:
    """Whether the spend reaches ``percent`` of either budget limit of ``scope``."""
    if percent is None:
        return False
    tokens = threshold(scope.budget_tokens, percent)
    micros = threshold(scope.budget_micros, percent)
    return (tokens >= 0 and spent_tokens >= tokens) or (micros >= 0 and spent_micros >= micros)


def limit_report(
    scope: Scope,
    now: float,
    *,
    requests: int,
    tokens: int,
    in_flight: int,
    spent_tokens: int | None,
    spent_micros: int | None,
) -> dict[str, object]:
    """What ``GET /v1/usage`` shows of one scope: each limit, what is left, when it resets."""
    reset = _iso((now // MINUTE + 1) * MINUTE)
    report: dict[str, object] = {"scope": scope.name}
    if scope.rpm is not None:
        report["requests_per_minute"] = {
            "limit": scope.rpm,
            "remaining": max(0, scope.rpm - requests),
            "resets_at": reset,
        }
    if scope.tpm is not None:
        report["tokens_per_minute"] = {"limit": scope.tpm, "remaining": max(0, scope.tpm - tokens), "resets_at": reset}
    if scope.concurrency is not None:
        report["concurrent_requests"] = {
            "limit": scope.concurrency,
            "in_use": in_flight,
            "remaining": max(0, scope.concurrency - in_flight),
        }
    if scope.has_budget:
        budget: dict[str, object] = {"period_start": _iso(scope.window_start), "resets_at": _iso(scope.window_end)}
        if scope.budget_micros is not None:
            spent = spent_micros or 0
            budget["usd"] = {
                "limit": _usd(scope.budget_micros),
                "spent": _usd(spent),
                "remaining": _usd(max(0, scope.budget_micros - spent)),
            }
        if scope.budget_tokens is not None:
            spent = spent_tokens or 0
            budget["tokens"] = {
                "limit": scope.budget_tokens,
                "spent": spent,
                "remaining": max(0, scope.budget_tokens - spent),
            }
        report["budget"] = budget
    return report


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _usd(micros: int) -> str:
    return f"{micros / 1_000_000:.6f}"
