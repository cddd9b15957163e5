"""Which account of a pool gets the next attempt: per-pool strategies, in process, no I/O.

:meth:`Selector.pick` looks at each candidate once (O(#candidates)) and skips accounts
that are excluded (already tried by this request), at their concurrency cap, or not
admitted by the health store. Accounts whose half-open trial is due are a last resort:
they are picked only when no admitted account is left, so a recovering account is
tested by real traffic only when nothing healthy can serve it (the prober re-admits
it otherwise; see accounts/tasks.py).

Strategies (``Pool.strategy``, read from the config snapshot on each pick, so a
change applies without a restart):

- ``weighted_round_robin``: nginx's smooth weighted round robin. Deterministic: with
  weights 5, 1, 1 every cycle of 7 picks is a a b a c a a.
- ``least_in_flight``: the fewest requests in flight relative to weight
  (in_flight / weight); ties go to the account picked least recently.
- ``fill_first``: the lowest ``priority`` (ties: lowest id) that is admitted and under
  its cap, so one account is drained before the next takes traffic.

In-flight counts are per process (:class:`InFlight`): the caller takes a :class:`Lease`
right after the pick, with no ``await`` in between (so two requests cannot both take
an account's last slot), and releases it when the attempt ends (the end of the relayed
stream for streams). ``max_concurrency`` is therefore enforced per gateway process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from types import TracebackType
from typing import Protocol

from accounts.health.machine import Admission
from accounts.upstream.account import AccountInfo

WEIGHTED_ROUND_ROBIN = "weighted_round_robin"
LEAST_IN_FLIGHT = "least_in_flight"
FILL_FIRST = "fill_first"
STRATEGIES = (WEIGHTED_ROUND_ROBIN, LEAST_IN_FLIGHT, FILL_FIRST)


class HealthView(Protocol):
    def admission(self, account_id: int, now: float | None = None) -> Admission: ...


class _AlwaysAdmit:
    def admission(self, account_id: int, now: float | None = None) -> Admission:
        return Admission.ADMIT


class Lease:
    """One attempt in flight on an account. ``release()`` is idempotent; also a context manager."""

    __slots__ = ("_counts", "_released", "account_id")

    def __init__(self, counts: dict[int, int], account_id: int) -> None:
        self._counts = counts
        self.account_id = account_id
        self._released = False
        counts[account_id] = counts.get(account_id, 0) + 1

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        left = self._counts.get(self.account_id, 1) - 1
        if left > 0:
            self._counts[self.account_id] = left
        else:
            self._counts.pop(self.account_id, None)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class InFlight:
    """Requests in flight per account in this process."""

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}

    def count(self, account_id: int) -> int:
        return self._counts.get(account_id, 0)

    def acquire(self, account_id: int) -> Lease:
        return Lease(self._counts, account_id)


class Selector:
    """Picks accounts per pool; keeps the round-robin and recency state of every pool."""

    def __init__(
        self,
        health: HealthView | None = None,
        inflight: InFlight | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.health: HealthView = health or _AlwaysAdmit()
        self.inflight = inflight or InFlight()
        self._clock = clock
        self._wrr: dict[int, dict[int, int]] = {}  # pool -> account -> current weight
        self._last: dict[int, dict[int, int]] = {}  # pool -> account -> pick sequence number
        self._seq = 0

    def pick(
        self,
        pool_id: int,
        candidates: Sequence[AccountInfo],
        *,
        strategy: str = WEIGHTED_ROUND_ROBIN,
        exclude: Collection[int] = (),
        sticky_account: int | None = None,
        now: float | None = None,
    ) -> AccountInfo | None:
        """The account for the next attempt among ``candidates`` (one pool's), or None.

        ``sticky_account``: the account bound to the request's prompt cache key; it wins
        when it is a candidate, not excluded, admitted (not merely due a trial) and under
        its cap. An unknown ``strategy`` falls back to weighted round robin.
        """
        now = self._clock() if now is None else now
        health, counts = self.health, self.inflight
        admitted: list[AccountInfo] = []
        trials: list[AccountInfo] = []
        for candidate in candidates:
            account_id = candidate.account_id
            if account_id in exclude:
                continue
            cap = candidate.max_concurrency
            if cap is not None and counts.count(account_id) >= cap:
                continue
            admission = health.admission(account_id, now)
            if admission is Admission.ADMIT:
                if account_id == sticky_account:
                    self._note(pool_id, account_id)
                    return candidate
                admitted.append(candidate)
            elif admission is Admission.TRIAL:
                trials.append(candidate)
        eligible = admitted or trials
        if not eligible:
            return None
        if strategy == LEAST_IN_FLIGHT:
            chosen = self._least_in_flight(pool_id, eligible)
        elif strategy == FILL_FIRST:
            chosen = min(eligible, key=lambda c: (c.priority, c.account_id))
        else:
            chosen = self._wrr_step(pool_id, eligible)
        self._note(pool_id, chosen.account_id)
        return chosen

    def _note(self, pool_id: int, account_id: int) -> None:
        self._seq += 1
        self._last.setdefault(pool_id, {})[account_id] = self._seq

    def _wrr_step(self, pool_id: int, eligible: Sequence[AccountInfo]) -> AccountInfo:
        current = self._wrr.setdefault(pool_id, {})
        total = 0
        best = eligible[0]
        best_weight: int | None = None
        for candidate in eligible:
            weight = max(1, candidate.weight)
            value = current.get(candidate.account_id, 0) + weight
            current[candidate.account_id] = value
            total += weight
            if best_weight is None or value > best_weight:
                best, best_weight = candidate, value
        current[best.account_id] -= total
        return best

    def _least_in_flight(self, pool_id: int, eligible: Sequence[AccountInfo]) -> AccountInfo:
        last = self._last.get(pool_id, {})
        count = self.inflight.count
        best = eligible[0]
        best_load, best_weight = count(best.account_id), max(1, best.weight)
        for candidate in eligible[1:]:
            load, weight = count(candidate.account_id), max(1, candidate.weight)
            # load / weight < best_load / best_weight, in integers.
            lhs, rhs = load * best_weight, best_load * weight
            if lhs < rhs or (lhs == rhs and last.get(candidate.account_id, 0) < last.get(best.account_id, 0)):
                best, best_load, best_weight = candidate, load, weight
        return best
