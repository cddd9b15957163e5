"""Account selection per pool (accounts/routing/selection.py) and sticky bindings (accounts/routing/stickiness.py)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from accounts.health.machine import AuthFailure, RateLimited, ServerError
from accounts.health.store import LocalHealthStore
from accounts.routing.selection import FILL_FIRST, LEAST_IN_FLIGHT, WEIGHTED_ROUND_ROBIN, InFlight, Selector
from accounts.routing.stickiness import LocalStickyStore, sticky_key
from accounts.upstream.account import AccountInfo

POOL = 1


def Acc(account_id: int, weight: int = 1, max_concurrency: int | None = None, priority: int = 0) -> AccountInfo:
    return AccountInfo(account_id, weight=weight, max_concurrency=max_concurrency, priority=priority)


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def picks(selector: Selector, accounts: list[AccountInfo], n: int, **options: object) -> list[int]:
    result = []
    for _ in range(n):
        chosen = selector.pick(POOL, accounts, **options)  # type: ignore[arg-type]
        assert chosen is not None
        result.append(chosen.account_id)
    return result


def report(store: LocalHealthStore, account_id: int, event: object) -> None:
    asyncio.run(store.report(account_id, event))  # type: ignore[arg-type]


# --- weighted round robin ----------------------------------------------------------------


def test_smooth_wrr_sequence_is_nginx_exact() -> None:
    accounts = [Acc(1, 5), Acc(2, 1), Acc(3, 1)]
    assert picks(Selector(), accounts, 14) == [1, 1, 2, 1, 3, 1, 1] * 2


@pytest.mark.parametrize("weights", [(1, 1, 1), (3, 2, 1), (10, 1), (7, 3, 2, 1)])
def test_wrr_distribution_is_exact_over_every_cycle(weights: tuple[int, ...]) -> None:
    accounts = [Acc(i + 1, w) for i, w in enumerate(weights)]
    cycle = sum(weights)
    selector = Selector()
    for _ in range(3):
        counts = Counter(picks(selector, accounts, cycle))
        assert counts == {i + 1: w for i, w in enumerate(weights)}


def test_wrr_is_smooth_not_bursty() -> None:
    # Weight 2:1 must interleave (1, 2, 1 or 1, 1, 2 once per cycle), never 1, 1, 1...
    sequence = picks(Selector(), [Acc(1, 2), Acc(2, 1)], 30)
    longest = max(len(run) for run in "".join(map(str, sequence)).split("2"))
    assert longest <= 2


def test_wrr_state_is_per_pool() -> None:
    selector = Selector()
    accounts = [Acc(1, 1), Acc(2, 1)]
    assert selector.pick(1, accounts).account_id == 1  # type: ignore[union-attr]
    assert selector.pick(2, accounts).account_id == 1  # type: ignore[union-attr]
    assert selector.pick(1, accounts).account_id == 2  # type: ignore[union-attr]


# --- exclusion, caps, health ---------------------------------------------------------------


def test_excluded_accounts_are_skipped() -> None:
    selector = Selector()
    accounts = [Acc(1), Acc(2), Acc(3)]
    assert set(picks(selector, accounts, 10, exclude={1, 3})) == {2}
    assert selector.pick(POOL, accounts, exclude={1, 2, 3}) is None


def test_accounts_at_their_cap_are_skipped_until_released() -> None:
    inflight = InFlight()
    selector = Selector(inflight=inflight)
    accounts = [Acc(1, max_concurrency=2), Acc(2, max_concurrency=1)]
    leases = []
    for _ in range(3):
        chosen = selector.pick(POOL, accounts)
        assert chosen is not None
        leases.append(inflight.acquire(chosen.account_id))
    assert inflight.count(1) == 2
    assert inflight.count(2) == 1
    assert selector.pick(POOL, accounts) is None  # everything at its cap
    leases[0].release()
    leases[0].release()  # idempotent
    chosen = selector.pick(POOL, accounts)
    assert chosen is not None
    assert chosen.account_id == leases[0].account_id
    with inflight.acquire(9):
        assert inflight.count(9) == 1
    assert inflight.count(9) == 0


def test_unusable_accounts_are_skipped_and_come_back() -> None:
    clock = Clock()
    health = LocalHealthStore(clock=clock)
    selector = Selector(health, clock=clock)
    accounts = [Acc(1), Acc(2), Acc(3)]
    report(health, 1, RateLimited(retry_after=10.0))
    report(health, 3, AuthFailure(401))
    assert set(picks(selector, accounts, 6)) == {2}
    clock.now += 10.0
    assert set(picks(selector, accounts, 6)) == {1, 2}


def test_half_open_accounts_are_a_last_resort() -> None:
    clock = Clock()
    health = LocalHealthStore(clock=clock)
    selector = Selector(health, clock=clock)
    accounts = [Acc(1), Acc(2)]
    for _ in range(3):
        report(health, 1, ServerError("502"))
    clock.now += 5.0  # account 1 is due a trial
    assert set(picks(selector, accounts, 5)) == {2}
    report(health, 2, RateLimited(retry_after=60.0))
    assert selector.pick(POOL, accounts) == Acc(1)  # nothing healthy left: trial it
    assert asyncio.run(health.try_acquire_probe(1))
    assert selector.pick(POOL, accounts) is None  # the trial is taken


# --- least in-flight -----------------------------------------------------------------------


def test_least_in_flight_prefers_the_idlest_relative_to_weight() -> None:
    inflight = InFlight()
    selector = Selector(inflight=inflight)
    accounts = [Acc(1, 1), Acc(2, 2), Acc(3, 1)]
    held = [inflight.acquire(1), inflight.acquire(2), inflight.acquire(2), inflight.acquire(3)]
    # Loads: 1/1, 2/2, 1/1: a three-way tie -> least recently picked (none picked yet: first).
    assert selector.pick(POOL, accounts, strategy=LEAST_IN_FLIGHT) == Acc(1)
    held[0].release()  # account 1: 0/1
    assert selector.pick(POOL, accounts, strategy=LEAST_IN_FLIGHT) == Acc(1)
    inflight.acquire(1)
    inflight.acquire(1)  # account 1: 2/1; accounts 2 and 3 tie at 1 (never picked: the first of them)
    assert selector.pick(POOL, accounts, strategy=LEAST_IN_FLIGHT) == Acc(2, 2)
    assert selector.pick(POOL, accounts, strategy=LEAST_IN_FLIGHT) == Acc(3)  # 2 was picked more recently


def test_least_in_flight_rotates_ties_when_idle() -> None:
    selector = Selector()
    accounts = [Acc(1), Acc(2), Acc(3)]
    assert picks(selector, accounts, 6, strategy=LEAST_IN_FLIGHT) == [1, 2, 3, 1, 2, 3]


def test_least_in_flight_spreads_concurrent_requests() -> None:
    inflight = InFlight()
    selector = Selector(inflight=inflight)
    accounts = [Acc(1, 1), Acc(2, 3)]
    for _ in range(8):
        chosen = selector.pick(POOL, accounts, strategy=LEAST_IN_FLIGHT)
        assert chosen is not None
        inflight.acquire(chosen.account_id)
    assert (inflight.count(1), inflight.count(2)) == (2, 6)


# --- fill first ----------------------------------------------------------------------------


def test_fill_first_drains_by_priority_then_id_respecting_caps() -> None:
    inflight = InFlight()
    selector = Selector(inflight=inflight)
    accounts = [Acc(3, priority=0, max_concurrency=2), Acc(1, priority=5), Acc(2, priority=0, max_concurrency=1)]
    order = []
    for _ in range(5):
        chosen = selector.pick(POOL, accounts, strategy=FILL_FIRST)
        assert chosen is not None
        inflight.acquire(chosen.account_id)
        order.append(chosen.account_id)
    # Priority 0 first, id 2 before id 3; each until its cap; then the unlimited priority 5.
    assert order == [2, 3, 3, 1, 1]


def test_fill_first_moves_on_when_the_first_account_cools_down() -> None:
    clock = Clock()
    health = LocalHealthStore(clock=clock)
    selector = Selector(health, clock=clock)
    accounts = [Acc(1, priority=0), Acc(2, priority=1)]
    assert set(picks(selector, accounts, 5, strategy=FILL_FIRST)) == {1}
    report(health, 1, RateLimited(quota_exhausted=True))
    assert set(picks(selector, accounts, 5, strategy=FILL_FIRST)) == {2}


def test_strategy_switches_between_picks_without_a_new_selector() -> None:
    selector = Selector()
    accounts = [Acc(1, 1, priority=1), Acc(2, 1, priority=0)]
    assert picks(selector, accounts, 2) == [1, 2]
    assert picks(selector, accounts, 2, strategy=FILL_FIRST) == [2, 2]
    assert picks(selector, accounts, 2, strategy=WEIGHTED_ROUND_ROBIN) == [1, 2]
    assert picks(selector, accounts, 2, strategy="no-such-strategy") == [1, 2]  # falls back to WRR


# --- stickiness ----------------------------------------------------------------------------


def test_sticky_account_wins_while_usable() -> None:
    clock = Clock()
    health = LocalHealthStore(clock=clock)
    selector = Selector(health, clock=clock)
    accounts = [Acc(1), Acc(2), Acc(3)]
    assert set(picks(selector, accounts, 5, sticky_account=3)) == {3}
    assert selector.pick(POOL, accounts, sticky_account=3, exclude={3}) != Acc(3)
    report(health, 3, RateLimited(retry_after=5.0))
    assert 3 not in picks(selector, accounts, 4, sticky_account=3)
    assert set(picks(selector, accounts, 3, sticky_account=99)) <= {1, 2, 3}  # not a candidate: ignored


def test_sticky_account_at_its_cap_is_not_forced() -> None:
    inflight = InFlight()
    selector = Selector(inflight=inflight)
    accounts = [Acc(1, max_concurrency=1), Acc(2)]
    inflight.acquire(1)
    assert selector.pick(POOL, accounts, sticky_account=1) == Acc(2)


def test_binding_is_kept_on_failover_while_the_bound_account_is_healthy() -> None:
    clock = Clock()
    health = LocalHealthStore(clock=clock)
    sticky = LocalStickyStore(ttl=3600)
    key = sticky_key(1, POOL, "conversation-a")
    assert sticky.bind(key, 1, health.usable)
    # Account 1 answered one 5xx (still healthy): the request failed over to 2.
    report(health, 1, ServerError("500"))
    assert not sticky.bind(key, 2, health.usable)
    assert asyncio.run(sticky.lookup(key)) == 1
    # Account 1 is now rate limited: the failover target takes the binding.
    report(health, 1, RateLimited(retry_after=30.0))
    assert sticky.bind(key, 2, health.usable)
    assert sticky.get(key) == 2
    # Rebinding the same account only refreshes it.
    assert not sticky.bind(key, 2, health.usable)


def test_bindings_expire_and_use_refreshes_them() -> None:
    clock = Clock()
    sticky = LocalStickyStore(ttl=100, clock=clock)
    sticky.bind("k", 1, lambda _: True)
    clock.now += 90
    sticky.bind("k", 1, lambda _: True)  # used again: expiry pushed back
    clock.now += 90
    assert sticky.get("k") == 1
    clock.now += 100
    assert sticky.get("k") is None
    assert len(sticky) == 0


def test_binding_store_is_a_bounded_lru() -> None:
    sticky = LocalStickyStore(max_entries=2)
    sticky.bind("a", 1, lambda _: True)
    sticky.bind("b", 2, lambda _: True)
    assert sticky.get("a") == 1  # a is now the most recently used
    sticky.bind("c", 3, lambda _: True)
    assert sticky.get("b") is None
    assert (sticky.get("a"), sticky.get("c")) == (1, 3)


def test_sticky_keys_separate_tenants_and_pools() -> None:
    base = sticky_key(1, 1, "cache-key")
    assert base == sticky_key(1, 1, "cache-key")
    assert len({base, sticky_key(2, 1, "cache-key"), sticky_key(1, 2, "cache-key"), sticky_key(1, 1, "other")}) == 4
    assert "cache-key" not in base
    assert len(base) == 32
