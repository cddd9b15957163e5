"""Usage records through Redis: a durable stream between the gateways and the database.

With Redis configured, usage leaves a gateway process through :class:`RedisUsageSink`
(the interface of the embedded :class:`gateway.metering.journal.JournalWriter`:
``record``, ``saturated``, ``aclose``). Here ``record`` is a list append and a background
task sends batches (``XADD gw:usage * e <json>`` per event, in one script call) every ``interval``, so a
SIGKILL of the gateway loses what the last interval held. The stream is never trimmed by
length: an entry leaves it only after the database has it.

:class:`UsageDrainer` reads the stream through the consumer group ``gw-writers`` (one
consumer per process) and writes batches with a writer callable (by default
``tenancy.services.usage.usage_records_write``, idempotent on ``request_id``), then XACKs
them. So:

- a database outage delays records and fails no request: the writer's failure leaves
  the entries pending, and they are retried with backoff (the drain loop's);
- a consumer that dies holding entries is relieved by the others: XAUTOCLAIM hands
  entries idle for ``claim_idle_ms`` to a living consumer (a slow but living one may
  then write them twice, which the idempotent writer absorbs);
- acknowledged entries are trimmed (``XTRIM MINID`` below the oldest entry some group
  still needs), and consumers idle for a day with nothing pending are deleted;
- an event that the writer refuses for its data (an error that is not an outage, see
  :func:`gateway.metering.database.is_transient`) is moved to ``{stream}:dead`` with an error logged, so that
  it cannot block the stream for ever; ``usage_drain --requeue-dead`` puts such
  entries back once the cause is fixed.

:class:`StreamSource` runs it in the drain loop (:mod:`gateway.metering.drain`): the usage
writer child of every gateway process and ``manage.py usage_drain`` share the work.

Redis must persist (AOF) for "never lost" to hold across a Redis restart; at shutdown
with Redis unreachable the sink spools what it holds to ``spool_dir`` (like the
embedded meter) and replays it into the stream on the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async
from redis.exceptions import ResponseError

from accounts.infra.batching import BackgroundFlush, write_or_requeue
from accounts.infra.redis import sync_client
from gateway.metering.codec import decode_event, encode_event
from gateway.metering.database import UsageWriteFailed, Writer, django_writer, write_batch
from gateway.metering.spool import Spool

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

logger = logging.getLogger(__name__)

STREAM = "gw:usage"
GROUP = "gw-writers"
FIELD = b"e"


# A batch of events in one script call (xadd.lua; run through redis-py's register_script).
XADD_LUA = (Path(__file__).parent / "xadd.lua").read_text()

# Consumers idle this long with nothing pending are removed from the group.
CONSUMER_MAX_IDLE_MS = 86_400_000


class RedisUsageSink:
    """Buffers usage events and XADDs them in batches off the request path.

    ``url`` (the Redis URL) enables the synchronous paths: :meth:`flush_sync` for a last
    flush with no event loop left (no ``atexit`` hook: the runtime closes the sink) and, with
    ``spool_dir``, spooling to disk what Redis refused at shutdown, or beyond ``max_buffer``
    events while Redis is unreachable (replayed into the stream by the next flush that finds
    the spool directory).
    """

    def __init__(
        self,
        redis: Redis,
        *,
        stream: str = STREAM,
        interval: float = 0.5,
        max_batch: int = 500,
        url: str | None = None,
        spool_dir: Path | None = None,
        max_buffer: int = 50_000,
    ) -> None:
        if spool_dir is not None and url is None:
            raise ValueError("spooling needs url= (spooled events are replayed with a synchronous client)")
        self._redis = redis
        self._xadd: AsyncScript | None = None
        self._max_buffer = max_buffer
        self._stream = stream
        self._interval = interval
        self._max_batch = max_batch
        self._url = url
        self._spill: Spool | None = None
        if spool_dir is not None:
            self._spill = Spool(spool_dir)
        self._buffer: list[dict[str, Any]] = []
        self._spilling: asyncio.Future[list[dict[str, Any]]] | None = None
        self._replay = self._spill is not None and self._spill.has_files()
        self._flusher = BackgroundFlush(
            self._step,
            pending=lambda: bool(self._buffer) or self._replay,
            what="usage to the Redis stream",
            linger=interval,
            min_backoff=interval,
            max_backoff=5.0,
            on_failure=self._spill_excess,
            log=logger,
        )
        self.written = 0

    def record(self, event: dict[str, Any]) -> None:
        """Queue one usage event. Never blocks, never raises."""
        self._buffer.append(event)
        self._flusher.kick()  # without a running loop, aclose() or flush_sync() sends it

    def pending(self) -> int:
        return len(self._buffer)

    @property
    def saturated(self) -> bool:
        """``max_buffer`` events wait that neither Redis nor the spool took: take no new work."""
        return len(self._buffer) >= self._max_buffer

    async def _step(self) -> None:
        """One pass of the background writer: replay the spool if it has files, then flush."""
        if self._replay and self._spill is not None:
            await sync_to_async(self._spill.replay, thread_sensitive=False)(self._xadd_sync)
            self._replay = False
        await self.flush()

    async def _spill_excess(self) -> None:
        """After a failed pass: past ``max_buffer`` events, spool them to disk (replayed later)."""
        if self._spill is None or len(self._buffer) < self._max_buffer:
            return
        batch, self._buffer = self._buffer, []  # taken here, on the loop: record() may run meanwhile
        # Shielded and kept: aclose() waits for a spill that its cancel interrupted.
        self._spilling = asyncio.ensure_future(sync_to_async(self._spill_batch, thread_sensitive=False)(batch))
        self._buffer[:0] = await asyncio.shield(self._spilling)  # what could not be spooled
        self._spilling = None
        self._replay = True

    async def flush(self) -> None:
        """Send everything buffered now; what fails stays buffered (and the error propagates)."""
        while self._buffer:
            batch = self._buffer[: self._max_batch]
            del self._buffer[: self._max_batch]
            # A partly sent batch is sent again: the writer is idempotent on request_id.
            self.written += await write_or_requeue(self._buffer, batch, self._xadd_batch)

    async def _xadd_batch(self, batch: list[dict[str, Any]]) -> None:
        if self._xadd is None:
            self._xadd = self._redis.register_script(XADD_LUA)
        await self._xadd((self._stream,), (FIELD, _lines(batch)))

    async def aclose(self) -> None:
        """Stop the background task and send what is left; spool it if Redis refuses."""
        await self._flusher.stop()
        if self._spilling is not None:  # interrupted by the cancel: it still runs in its thread
            self._buffer[:0] = await self._spilling
            self._spilling = None
        try:
            await self.flush()
        except Exception:
            logger.warning("usage XADD failed at shutdown", exc_info=True)
            batch, self._buffer = self._buffer, []
            lost = await sync_to_async(self._spill_batch, thread_sensitive=False)(batch)
            if lost:
                logger.error("%d usage events lost: Redis unreachable and nowhere to spool them", len(lost))

    def flush_sync(self) -> None:
        """Blocking flush with no event loop left: XADD, else spool, else log."""
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        try:
            self._xadd_sync(batch)
            self.written += len(batch)
        except Exception:
            logger.warning("usage XADD failed at exit", exc_info=True)
            lost = self._spill_batch(batch)
            if lost:
                logger.error("%d usage events lost: Redis unreachable and nowhere to spool them", len(lost))

    def _spill_batch(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Blocking: one more synchronous XADD, else write to the spool directory.

        Returns the events that could go nowhere (no spool directory, disk error).
        """
        if not batch:
            return []
        if self._spill is None:
            return batch
        try:
            self._xadd_sync(batch)  # Redis once more
            self.written += len(batch)
            return []
        except Exception:
            logger.warning("usage XADD failed again; spooling %d events to disk", len(batch), exc_info=True)
        try:
            self._spill.write(batch)
        except Exception:
            logger.exception("spooling %d usage events to disk failed", len(batch))
            return batch  # a spool file is written whole or not at all
        return []

    def _xadd_sync(self, events: Sequence[dict[str, Any]]) -> None:
        if self._url is None:
            raise RuntimeError("RedisUsageSink needs url= for synchronous writes")
        sync_client(self._url).register_script(XADD_LUA)((self._stream,), (FIELD, _lines(events)))


def _lines(events: Sequence[dict[str, Any]]) -> bytes:
    """The events as xadd.lua takes them: their JSON, one a line."""
    return b"\n".join(encode_event(event) for event in events)


Entry = tuple[bytes, dict[bytes, bytes] | None]


class UsageDrainer:
    """Moves usage events from the stream to the database, acknowledging only what was written.

    A writer error that is transient (:func:`gateway.metering.database.is_transient`) leaves
    the batch pending for a retry after a backoff; any other error makes the drainer
    write the batch event by event and move the events still refused to
    ``{stream}:dead`` (``usage_drain --requeue-dead`` puts them back once fixed).
    """

    def __init__(
        self,
        redis: Redis,
        writer: Writer = django_writer,
        *,
        stream: str = STREAM,
        group: str = GROUP,
        consumer: str | None = None,
        batch: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        claim_interval: float = 15.0,
        housekeeping_interval: float = 10.0,
    ) -> None:
        self._redis = redis
        self._writer = writer
        self.stream = stream
        self.dead_stream = stream + ":dead"
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self._batch = batch
        self._block_ms = block_ms
        self._claim_idle_ms = claim_idle_ms
        self._claim_interval = claim_interval
        self._housekeeping_interval = housekeeping_interval
        self._own_pending = True  # a restarted consumer of the same name may hold some
        self._claim_cursor: bytes | str = "0-0"
        self._next_claim = 0.0
        self._next_housekeeping = 0.0
        self._group_ready = False
        self.written = 0

    async def ensure_group(self) -> None:
        """Create the stream and the group (reading from the start) unless they exist."""
        try:
            await self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def step(self, *, block: bool = True) -> int:
        """Handle one batch: own pending entries, then claimable ones, then new ones.

        Returns how many entries were dealt with (written, or set aside as unreadable;
        0: nothing to do); raises :class:`UsageWriteFailed` when the writer failed for
        the whole batch (the entries stay pending).
        """
        if not self._group_ready:
            await self.ensure_group()
        try:
            entries = await self._next_entries(block)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()  # the stream vanished (Redis restart): start over
            entries = []
        handled = await self._handle(entries) if entries else 0
        if time.monotonic() >= self._next_housekeeping:
            self._next_housekeeping = time.monotonic() + self._housekeeping_interval
            try:
                await self.housekeeping()
            except Exception:
                logger.warning("usage stream housekeeping failed", exc_info=True)
        return handled

    async def _next_entries(self, block: bool) -> list[Entry]:
        entries: list[Entry] = []
        if self._own_pending:
            entries = await self._read("0", None)
            self._own_pending = bool(entries)
            if entries and len(entries) < self._batch:
                # Fill up with new entries: one bad event must not starve the stream,
                # and a batch with good events tells bad data from an outage.
                entries += await self._read(">", None, self._batch - len(entries))
        if not entries and time.monotonic() >= self._next_claim:
            entries = await self._claim()
        if not entries:
            entries = await self._read(">", self._block_ms if block else None)
        return entries

    async def _read(self, start: str, block: int | None, count: int | None = None) -> list[Entry]:
        reply = await self._redis.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=count or self._batch, block=block
        )
        streams = reply.values() if isinstance(reply, dict) else (item[1] for item in reply or ())
        return [entry for entries in streams for entry in _entries(entries)]

    async def _claim(self) -> list[Entry]:
        """Take over entries that other (dead) consumers left pending for ``claim_idle_ms``."""
        while True:
            reply = await self._redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                self._claim_idle_ms,
                start_id=self._claim_cursor,
                count=self._batch,
            )
            self._claim_cursor = reply[0]
            entries = [entry for entry in _entries(reply[1]) if entry[1] is not None]
            if self._claim_cursor in (b"0-0", "0-0"):
                self._next_claim = time.monotonic() + self._claim_interval
                return entries
            if entries:
                return entries

    async def _handle(self, entries: list[Entry]) -> int:
        events: list[dict[str, Any]] = []
        ids: list[bytes] = []
        gone: list[bytes] = []
        junk: list[tuple[bytes, dict[bytes, bytes]]] = []
        for entry_id, fields in entries:
            if fields is None:
                gone.append(entry_id)  # deleted from the stream while pending: nothing to write
                continue
            try:
                events.append(decode_event(fields[FIELD]))
                ids.append(entry_id)
            except (KeyError, ValueError):
                logger.error("usage stream entry %r is unreadable; moved to %s", entry_id, self.dead_stream)
                junk.append((entry_id, fields))
        if gone:
            await self._redis.xack(self.stream, self.group, *gone)
        if junk:
            await self._bury(junk)
        set_aside = len(gone) + len(junk)
        if not events:
            return set_aside
        result = await asyncio.to_thread(write_batch, self._writer, events)
        if result.bad:
            self._own_pending = True
            logger.error(
                "the usage writer refused %d events (%s; first error: %s); moved to %s",
                len(result.bad),
                ", ".join(str(events[i].get("request_id")) for i in result.bad[:10]),
                result.reason,
                self.dead_stream,
            )
            await self._bury([(ids[i], {FIELD: encode_event(events[i])}) for i in result.bad])
        if result.done:
            await self._redis.xack(self.stream, self.group, *(ids[i] for i in result.done))
            self.written += len(result.done)
        if result.outage is not None:
            self._own_pending = True  # what is not written stays pending for the retry
            raise UsageWriteFailed(str(result.outage)) from result.outage
        return set_aside + len(result.done) + len(result.bad)

    async def requeue_dead(self) -> int:
        """Move every entry of ``{stream}:dead`` back to the stream (after fixing the cause)."""
        moved = 0
        while True:
            entries: list[Any] = await self._redis.xrange(self.dead_stream, count=self._batch) or []
            if not entries:
                return moved
            pipe = self._redis.pipeline(transaction=True)
            for entry_id, fields in entries:
                if FIELD in fields:
                    pipe.xadd(self.stream, {FIELD: fields[FIELD]})  # without the "id" it was buried with
                pipe.xdel(self.dead_stream, entry_id)
            await pipe.execute()
            moved += len(entries)

    async def _bury(self, entries: Sequence[tuple[bytes, dict[bytes, bytes]]]) -> None:
        pipe = self._redis.pipeline(transaction=True)
        for entry_id, fields in entries:
            payload: dict[Any, Any] = {**fields, b"id": entry_id}
            pipe.xadd(self.dead_stream, payload)
        pipe.xack(self.stream, self.group, *(entry_id for entry_id, _ in entries))
        await pipe.execute()

    async def housekeeping(self) -> None:
        """Trim what every group acknowledged; forget consumers long idle with nothing pending."""
        try:
            groups = await self._redis.xinfo_groups(self.stream)
        except ResponseError:
            return  # no stream yet
        keep: tuple[int, int] | None = None
        for group in groups:
            if group["pending"]:
                summary = await self._redis.xpending(self.stream, group["name"])
                needed = _parse_id(summary["min"])
            else:
                ms, seq = _parse_id(group["last-delivered-id"])
                needed = (ms, seq + 1)
            keep = needed if keep is None else min(keep, needed)
        if keep is not None and keep > (0, 1):
            await self._redis.xtrim(self.stream, minid=f"{keep[0]}-{keep[1]}")
        for consumer in await self._redis.xinfo_consumers(self.stream, self.group):
            name = consumer["name"]
            if name in (self.consumer, self.consumer.encode()):
                continue
            if not consumer["pending"] and consumer["idle"] > CONSUMER_MAX_IDLE_MS:
                await self._redis.xgroup_delconsumer(self.stream, self.group, name)

    async def drain(self) -> int:
        """Deal with everything available now (claimable entries included); return how many."""
        self._next_claim = 0.0
        total = 0
        while True:
            handled = await self.step(block=False)
            if not handled and not self._own_pending:
                return total
            total += handled


class StreamSource:
    """The Redis stream as a :class:`gateway.metering.drain.Source`.

    Each step blocks in XREADGROUP for up to ``block_ms`` when the stream is empty, so
    the drain loop runs it back to back; the last pass retries until ``wait`` runs out.
    """

    name = "stream"

    def __init__(self, drainer: UsageDrainer) -> None:
        self.drainer = drainer

    async def step(self) -> int:
        await self.drainer.step(block=True)
        return 1  # never idle-wait: the step itself blocked for new entries

    async def finish(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            try:
                await self.drainer.drain()
                return
            except Exception:
                if time.monotonic() >= deadline:
                    raise
                logger.warning("last usage pass failed; retrying", exc_info=True)
                await asyncio.sleep(0.5)


def _entries(raw: Any) -> list[Entry]:
    return [(entry[0], entry[1]) for entry in raw or ()]


def _parse_id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return (int(ms), int(seq or 0))
