"""API keys on demand: loaded on first use, cached within a bound, invalidated one by one.

A serving process holds no copy of the key table. :class:`KeyDirectory` answers "which key
has this prefix":

- from its cache (:class:`ExpiringCache`: at most ``size`` keys, the one stored longest ago
  evicted first, each entry re-read after :data:`KEY_CACHE_SECONDS` so that edits made with
  raw SQL, which announce nothing, still arrive);
- else, for a prefix that is not in the membership set (:class:`PrefixSet`: every stored
  prefix as 8 bytes in one sorted array, loaded once in the background at start and kept
  current by the change feed) or that was found unknown lately (the negative cache, as
  large), with None at once: an unknown-prefix flood never reaches the database;
- else by reading it: misses wait in a queue, and one reader reads every prefix queued so
  far in one indexed query (``load``, in a worker thread, off the event loop), then the ones
  queued meanwhile, and so on; concurrent misses of one prefix share one read.

One read at a time, of many prefixes, rather than a read per key in parallel threads: a cold
start with many keys in use (a restart, the benchmark's 10,000 keys) made each of 16 parallel
one-key reads wait for the event loop's thread to hand over the GIL several times per query
(about 450 first uses a second on the 2-core machine, ``make bench`` row "key mix first use");
one query for all of them crosses threads once.

:meth:`KeyDirectory.invalidate` applies the change feed: a changed key is dropped (and its
prefix becomes a member), a changed tenant drops its cached keys and the negative cache.
A read that was running when its key changed is not cached, and later callers start a new
one, so a revoked key is refused on the very next request after the change is applied.
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from gateway.config.snapshot import KeyInfo, key_info
from tenancy.keys import KEY_MARKER, PREFIX_LENGTH

logger = logging.getLogger(__name__)

# A cached key (or unknown prefix) is read again after this many seconds.
KEY_CACHE_SECONDS = 600.0
# Prefixes read by one query at most (the rest wait for the next one).
READ_BATCH = 500

_MASK = (1 << 64) - 1

V = TypeVar("V")


class ExpiringCache(Generic[V]):
    """At most ``size`` entries, each answered for ``ttl`` seconds after it was stored; when
    full, the entry stored longest ago is evicted (storing a key again makes it the newest).

    Hand-written instead of ``cachetools.TTLCache`` because a hit is on every request's path:
    here one dict lookup and one clock read, 0.2 µs, against 2.1 µs for ``TTLCache.get``
    (``python -m timeit``, docs/performance.md "The gap to 064532d, closed"). Eviction by age of storing
    rather than of use: an evicted key that is still used costs one read, and every entry is
    read again after ``ttl`` anyway.
    """

    __slots__ = ("_clock", "_entries", "_size", "_ttl")

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._size = size
        self._ttl = ttl
        self._clock = clock

    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        return entry[1]

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __setitem__(self, key: str, value: V) -> None:
        entries = self._entries
        entries.pop(key, None)
        while len(entries) >= self._size:
            entries.popitem(last=False)
        entries[key] = (self._clock() + self._ttl, value)

    def pop(self, key: str, default: V | None = None) -> V | None:
        entry = self._entries.pop(key, None)
        return default if entry is None else entry[1]

    def items(self) -> list[tuple[str, V]]:
        """The entries still answered."""
        now = self._clock()
        return [(key, value) for key, (expires, value) in self._entries.items() if expires > now]

    def __delitem__(self, key: str) -> None:
        del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def prefix_number(prefix: str) -> int | None:
    """The 64-bit number that stands for ``prefix`` in a :class:`PrefixSet` (its string hash,
    fixed for the life of the process), or None if it lacks a gateway key prefix's shape. Two
    prefixes may share a number (about one random prefix in 10**13 against a million stored):
    such a false hit costs one database read, never a wrong answer."""
    if len(prefix) != PREFIX_LENGTH or not prefix.startswith(KEY_MARKER):
        return None
    return hash(prefix) & _MASK


class PrefixSet:
    """Every stored key prefix, compactly: their numbers (:func:`prefix_number`) in a sorted
    ``array('Q')`` (8 bytes a prefix, 8 MB for a million) plus the few added since it was
    built. Membership is a binary search; a number, not the prefix, so a hit is "maybe"."""

    __slots__ = ("_added", "_sorted")

    def __init__(self, prefixes: Iterable[str] = ()) -> None:
        numbers = (prefix_number(prefix) for prefix in prefixes)
        self._sorted = array("Q", sorted(n for n in numbers if n is not None))
        self._added: set[int] = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._added)

    def add(self, prefix: str) -> None:
        number = prefix_number(prefix)
        if number is not None and number not in self:
            self._added.add(number)

    def __contains__(self, number: object) -> bool:
        if number in self._added:
            return True
        index = bisect_left(self._sorted, number)  # type: ignore[call-overload]
        return index < len(self._sorted) and self._sorted[index] == number

    def has(self, prefix: str) -> bool:
        number = prefix_number(prefix)
        return number is not None and number in self


class KeyDirectory:
    """The keys this process has seen (see the module docstring).

    ``load(prefixes)``: the snapshot rows of the usable keys among ``prefixes``, by prefix
    (``tenancy.selectors.apikeys_for_snapshot_by_prefix``); blocking, run in a worker thread.
    ``size``: the bound of each cache.
    """

    def __init__(
        self,
        load: Callable[[list[str]], Mapping[str, Mapping[str, Any]]],
        *,
        size: int,
        ttl: float = KEY_CACHE_SECONDS,
        timeout: float | None = None,
        on_state: Callable[[str | None], None] = lambda reason: None,
        run: Callable[[Callable[[list[str]], Any], list[str]], Awaitable[Any]] | None = None,
    ) -> None:
        self._load = load
        self._run = run or asyncio.to_thread
        self._on_state = on_state  # a read's failure (its error's class) or success: readiness
        self._timeout = timeout  # a read not answered by then raises TimeoutError (a silent database)
        self._known: ExpiringCache[KeyInfo] = ExpiringCache(size, ttl)
        self._unknown: ExpiringCache[bool] = ExpiringCache(size, ttl)
        self._pending: dict[str, asyncio.Future[KeyInfo | None]] = {}
        self._queue: list[tuple[str, asyncio.Future[KeyInfo | None]]] = []  # misses not read yet
        self._reader: asyncio.Task[None] | None = None
        self.members: PrefixSet | None = None
        # Prefixes changed while the membership set was loading: added to it once loaded.
        self._changed_early: set[str] = set()
        self.reads = 0  # database reads made (for the scale benchmark's log line and tests)

    def __len__(self) -> int:
        return len(self._known)

    def set_members(self, members: PrefixSet) -> None:
        """Install the membership set (loaded in the background); until then, only the
        negative cache keeps unknown prefixes from the database."""
        for prefix in self._changed_early:
            members.add(prefix)
        self._changed_early.clear()
        self.members = members

    def cached(self, prefix: str) -> KeyInfo | None:
        """The usable key with ``prefix`` if this process has it at hand (no await: the hot
        path's common case), else None (then :meth:`get` knows)."""
        return self._known.get(prefix)

    async def get(self, prefix: str) -> KeyInfo | None:
        """The usable key with ``prefix`` (maybe expired: checked per request), or None."""
        info = self._known.get(prefix)
        if info is not None:
            return info
        members = self.members
        if (members is not None and not members.has(prefix)) or prefix in self._unknown:
            return None
        pending = self._pending.get(prefix)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._pending[prefix] = pending
            self._queue.append((prefix, pending))
            if self._reader is None or self._reader.done():
                self._reader = asyncio.ensure_future(self._read_queued())
        # shield: a caller cancelled (its client left) does not cancel the others' read.
        return await asyncio.shield(pending)

    async def _read_queued(self) -> None:
        """Read the queued prefixes, :data:`READ_BATCH` at a time, until none is left."""
        while self._queue:
            batch, self._queue = self._queue[:READ_BATCH], self._queue[READ_BATCH:]
            self.reads += 1
            try:
                rows = await asyncio.wait_for(self._run(self._load, [prefix for prefix, _ in batch]), self._timeout)
            except Exception as exc:
                self._on_state(f"API key read failed: {type(exc).__name__}")
                for prefix, future in batch:
                    self._settle(prefix, future)
                    if not future.done():
                        future.set_exception(exc)
                continue
            self._on_state(None)
            for prefix, future in batch:
                row = rows.get(prefix)
                info = key_info(row, {}) if row is not None else None
                if self._settle(prefix, future):  # invalidated while queued or read: not cached
                    if info is None:
                        self._unknown[prefix] = True
                    else:
                        self._known[prefix] = info
                if not future.done():
                    future.set_result(info)

    def _settle(self, prefix: str, future: asyncio.Future[KeyInfo | None]) -> bool:
        """Forget ``future`` as the pending read of ``prefix``; False if it no longer was."""
        if self._pending.get(prefix) is not future:
            return False
        del self._pending[prefix]
        return True

    def invalidate(self, prefixes: Iterable[str] = (), tenants: Iterable[int] = ()) -> None:
        """Apply changes: drop these keys (their prefixes become members) and the keys of these
        tenants (and every unknown prefix: a reactivated tenant's keys are usable again)."""
        for prefix in prefixes:
            self._known.pop(prefix, None)
            self._unknown.pop(prefix, None)
            self._pending.pop(prefix, None)
            if self.members is not None:
                self.members.add(prefix)
            else:
                self._changed_early.add(prefix)
        tenant_ids = set(tenants)
        if tenant_ids:
            for prefix, info in list(self._known.items()):
                if info.tenant_id in tenant_ids:
                    del self._known[prefix]
            self._unknown.clear()
            self._pending.clear()

    def clear(self) -> None:
        """Forget every cached key (the change feed could not be followed)."""
        self._known.clear()
        self._unknown.clear()
        self._pending.clear()
