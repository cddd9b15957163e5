"""Sticky bindings: requests sharing a prompt cache key go to the same account.

Upstream prompt caches live per account, so a conversation that keeps hitting one
account keeps its cache warm. A binding maps a :func:`sticky_key` (tenant, pool and
the request's ``prompt_cache_key``, hashed) to an account id and
expires ``ttl`` seconds after its last use.

The rule that keeps bindings stable: :meth:`LocalStickyStore.bind` replaces a binding
only when it is missing or its account is no longer usable. A request that failed over
to another account while the bound one is still healthy (a single 5xx, a cap reached)
leaves the binding alone, so the next request returns to the warm cache.

:class:`LocalStickyStore` holds bindings in process (bounded LRU + TTL). With Redis,
:class:`RedisStickyStore` shares them: a binding confirmed here in the last ``local_ttl``
seconds is answered locally. Otherwise the data plane reads it along with the request's
admission (:meth:`RedisStickyStore.stale` names the keys to read, ``learn`` takes the
values), so a new prompt_cache_key costs no round trip of its own; ``lookup`` asks Redis
itself (one ``GET``) only for a binding nobody read. Writes (``SET key id EX ttl``) go
through the ``carry`` callable, which sends them with the next admission (or a
background batch); a binding used again is re-sent at most every ``ttl / 4`` to
refresh its expiry.

Redis layout: ``{prefix}:{key}`` -> account id as a decimal string, with ``EX ttl``
(``prefix`` defaults to ``gw:sticky``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from cachetools import LRUCache, TTLCache

if TYPE_CHECKING:
    import redis.asyncio as redis_async

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "gw:sticky"
Usable = Callable[[int], bool]
Carry = Callable[[str, str, int], None]  # (Redis key, value, ttl seconds): send without waiting
# How long "Redis has no binding for this key" is trusted: long enough for the request that
# read it along with its admission to be dispatched without asking again, short enough that
# a binding another replica makes meanwhile is seen by this replica's next request.
ABSENT_TTL = 2.0


class _Binding:
    __slots__ = ("account_id", "checked_at", "expires_at", "sent_at")

    def __init__(self, account_id: int, expires_at: float, checked_at: float, sent_at: float) -> None:
        self.account_id = account_id
        self.expires_at = expires_at
        self.checked_at = checked_at  # last confirmed from Redis (or set here)
        self.sent_at = sent_at  # last written to Redis


def sticky_key(tenant_id: int, pool_id: int, value: str) -> str:
    """The binding key of ``value`` (a prompt_cache_key) for a tenant and pool.

    Hashed: tenants' keys never meet, the length is bounded, and Redis never sees the raw value.
    """
    material = f"{tenant_id}\x00{pool_id}\x00{value}".encode()
    return hashlib.blake2b(material, digest_size=16).hexdigest()


class LocalStickyStore:
    """Bindings in this process: at most ``max_entries`` (least recently used dropped first)."""

    def __init__(
        self, *, ttl: float = 3600.0, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self._clock = clock
        # Least recently used dropped first (a read counts as a use); each entry has its own expiry.
        self._entries: LRUCache[str, _Binding] = LRUCache(maxsize=max_entries)

    def get(self, key: str) -> int | None:
        """The bound account, or None (missing or expired). Local only, never I/O."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            del self._entries[key]
            return None
        return entry.account_id

    async def lookup(self, key: str) -> int | None:
        """The bound account, or None. (The Redis store may ask Redis on a local miss.)"""
        return self.get(key)

    def bind(self, key: str, account_id: int, usable: Usable) -> bool:
        """Record that ``account_id`` served ``key``; returns True if the binding changed.

        Keeps an existing binding to another account while ``usable(bound_id)`` holds
        (pass the health store's ``usable``, and also check the account still serves
        the pool). Binding the same account again refreshes its expiry.
        """
        now = self._clock()
        current = self.get(key)
        if current is not None and current != account_id and usable(current):
            return False
        self._store(key, account_id, now, changed=current != account_id)
        return current != account_id

    def _store(self, key: str, account_id: int, now: float, *, changed: bool) -> None:
        entry = self._entries.get(key)
        if entry is None or changed:
            self._put(key, _Binding(account_id, now + self.ttl, now, float("-inf")))
        else:
            entry.expires_at = now + self.ttl
            self._entries[key] = entry  # a use: the most recent

    def _put(self, key: str, binding: _Binding) -> None:
        self._entries[key] = binding

    def __len__(self) -> int:
        return len(self._entries)

    async def aclose(self) -> None:
        """Nothing to close in process."""


class RedisStickyStore(LocalStickyStore):
    """Bindings shared through Redis, with a local cache in front (module docstring).

    ``carry(redis_key, value, ttl)`` sends a binding: it must not wait (the data plane
    passes the rate limiter's ride-along queue, ``RedisLimiter.carry``).
    """

    def __init__(
        self,
        redis: redis_async.Redis,
        *,
        carry: Carry,
        ttl: float = 3600.0,
        local_ttl: float = 30.0,
        max_entries: int = 100_000,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(ttl=ttl, max_entries=max_entries, clock=clock)
        self._redis = redis
        self._carry = carry
        self._local_ttl = local_ttl
        self.prefix = prefix
        # Keys Redis had no binding for, and when it said so (trusted ABSENT_TTL): a new
        # prompt_cache_key read with the admission is not asked again by dispatch.
        self._absent: TTLCache[str, bool] = TTLCache(maxsize=max_entries, ttl=ABSENT_TTL, timer=clock)

    def redis_key(self, key: str) -> str:
        """Where the binding of ``key`` lives in Redis."""
        return f"{self.prefix}:{key}"

    def stale(self, keys: Iterable[str]) -> list[str]:
        """The ``keys`` whose binding must be read from Redis (not confirmed in the last ``local_ttl``)."""
        now = self._clock()
        return [key for key in keys if not self._fresh(key, now)]

    def _fresh(self, key: str, now: float) -> bool:
        entry = self._entries.get(key)
        if entry is None:
            return key in self._absent
        return now - entry.checked_at < self._local_ttl and entry.expires_at > now

    async def lookup(self, key: str) -> int | None:
        if self._fresh(key, self._clock()):
            return self.get(key)
        try:
            raw = await self._redis.get(self.redis_key(key))
        except Exception:
            logger.warning("sticky lookup: Redis unavailable, using the local binding")
            return self.get(key)
        return self.learn(key, raw)

    def learn(self, key: str, raw: object) -> int | None:
        """Take the binding of ``key`` as read from Redis (``raw``: its value, None if missing)."""
        if raw is None:
            self._entries.pop(key, None)
            self._absent[key] = True
            return None
        try:
            account_id = int(raw) if isinstance(raw, bytes | str) else int(str(raw))
        except ValueError:
            return None
        # Fresh from Redis: valid locally for local_ttl; Redis keeps the real expiry, which
        # we cannot see, so the next use here re-sends it (sent_at = -inf).
        now = self._clock()
        self._put(key, _Binding(account_id, now + self.ttl, now, float("-inf")))
        return account_id

    def bind(self, key: str, account_id: int, usable: Usable) -> bool:
        changed = super().bind(key, account_id, usable)
        self._absent.pop(key, None)
        entry = self._entries.get(key)
        if entry is None or entry.account_id != account_id:
            return changed  # kept another healthy binding: nothing to send
        now = self._clock()
        if changed or now - entry.sent_at >= self.ttl / 4:
            entry.sent_at = now
            entry.checked_at = now
            self._carry(self.redis_key(key), str(account_id), max(1, int(self.ttl)))
        return changed
