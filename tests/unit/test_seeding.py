"""Batched budget seeds (gateway/limits/seeding.py): the scopes waiting while a query runs form the next one."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

import pytest

from gateway.limits.engine import Scope
from gateway.limits.seeding import BatchSeed


class FakeFetch:
    """Answers from a table, one call at a time, recording every batch it was asked for."""

    def __init__(self, spent: dict[int, tuple[int, Decimal]], fail: bool = False) -> None:
        self.spent = spent
        self.fail = fail
        self.calls: list[tuple[str, list[int], datetime, datetime]] = []
        self.release = asyncio.Event()

    async def __call__(
        self, scope: str, ids: Sequence[int], start: datetime, end: datetime
    ) -> dict[int, tuple[int, Decimal]]:
        self.calls.append((scope, list(ids), start, end))
        await self.release.wait()
        if self.fail:
            raise OSError("database down")
        return {i: self.spent[i] for i in ids if i in self.spent}


def scope(scope_id: int, name: str = "key", start: int = 1_000, end: int = 2_000) -> Scope:
    return Scope(name, scope_id, budget_tokens=10, window_start=start, window_end=end)


def test_waiting_scopes_share_one_query_per_window() -> None:
    async def main() -> None:
        fetch = FakeFetch({1: (10, Decimal("0.5")), 2: (20, Decimal(0))})
        seed = BatchSeed(fetch)
        first = asyncio.ensure_future(seed(scope(1)))
        while not fetch.calls:  # the first query starts with scope 1 alone
            await asyncio.sleep(0)
        assert [c[1] for c in fetch.calls] == [[1]]
        # While it runs, more scopes ask: keys 2 and 3 (one window), a tenant (another), key 2 again.
        rest = [asyncio.ensure_future(seed(s)) for s in (scope(2), scope(3), scope(7, "tenant"), scope(2))]
        await asyncio.sleep(0)
        fetch.release.set()
        results = await asyncio.gather(first, *rest)
        assert results == [(10, 500_000), (20, 0), (0, 0), (0, 0), (20, 0)]
        assert [(c[0], c[1]) for c in fetch.calls] == [("key", [1]), ("key", [2, 3]), ("tenant", [7])]
        assert seed.queries == 3
        assert fetch.calls[0][2].timestamp() == 1_000
        assert fetch.calls[0][3].timestamp() == 2_000

    asyncio.run(main())


def test_a_failed_query_fails_its_waiters_and_the_next_one_runs() -> None:
    async def main() -> None:
        fetch = FakeFetch({}, fail=True)
        fetch.release.set()
        seed = BatchSeed(fetch)
        with pytest.raises(OSError, match="database down"):
            await seed(scope(1))
        fetch.fail = False
        fetch.spent = {1: (5, Decimal("0.000001"))}
        assert await seed(scope(1)) == (5, 1)

    asyncio.run(main())


def test_batches_are_capped() -> None:
    async def main() -> None:
        fetch = FakeFetch({})
        fetch.release.set()
        seed = BatchSeed(fetch, max_batch=2)
        await asyncio.gather(*(seed(scope(i)) for i in range(5)))  # all five wait before the first query
        assert [c[1] for c in fetch.calls] == [[0, 1], [2, 3], [4]]

    asyncio.run(main())
