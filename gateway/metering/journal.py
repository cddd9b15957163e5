"""Usage records on disk: the embedded path from a response to the database.

A gateway process does not write usage to the database itself: the write holds the GIL
the event loop needs, and under sustained load a writer thread both stalled requests
(the p99 tail) and fell behind (the buffer, and RSS, grew with the backlog; see
docs/performance.md). Instead:

- :class:`JournalWriter` (hot path): :meth:`~JournalWriter.record` appends one JSON line
  to the process's current segment ``DIR/<time_ns>-<pid>.jsonl`` with one ``os.write``
  (``O_APPEND``). A segment is held under an exclusive ``flock`` while its writer has it
  open, and is rotated at ``segment_bytes``.
- :class:`JournalDrainer` (the usage writer process, ``gateway.metering.writer``, or
  ``manage.py usage_drain --once``): reads every segment from its offset to the last
  complete line, writes batches with ``tenancy.services.usage.usage_records_write``
  (idempotent on ``request_id``), and deletes a segment once it is read to the end and
  no writer holds it. One drainer is active per directory (``flock`` on ``.drain.lock``);
  the others stand by and take over when it goes.

Guarantees: a record is in the kernel's page cache when its request ends, so it
survives a crash or SIGKILL of the gateway process (not a power cut: there is no
``fsync``). A full or failing disk holds records in memory, bounded (see
:class:`JournalWriter`). A database outage delays records and fails no request: offsets
only move past what was written, and a restarted drainer re-reads from the start of each
segment, which the idempotent writer absorbs. An event the database refuses for its
data, or a line that is not JSON, goes to ``DIR/dead.jsonl`` with an error logged.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway.conf.files import private_directory
from gateway.metering.codec import decode_event, encode_event
from gateway.metering.database import UsageWriteFailed, Writer, django_writer, write_batch

logger = logging.getLogger(__name__)

SEGMENT_BYTES = 8 << 20
LOCK_NAME = ".drain.lock"
DEAD_NAME = "dead.jsonl"

# While appends fail (a full or failing disk), they are retried this often (seconds), and
# at shutdown for this long before the records still held are given up (logged).
RETRY_SECONDS = 1.0
CLOSE_WAIT_SECONDS = 5.0


class JournalWriter:
    """Appends usage events to this process's journal segment, one ``os.write`` each.

    :meth:`record` appends at once, so a record is in the kernel's page cache before the
    request that made it has finished: a SIGKILL or crash of the gateway process right
    after a client got its answer loses nothing. Measured (``bench/journal_flush.py``): 1-2 µs
    of CPU per record more than appending in batches every 50 ms (which lost the last 50 ms
    of records to a SIGKILL), under 1 % of the ~300 µs a request costs the gateway.

    While appends fail (a full or failing disk) records are kept in memory and retried
    every ``RETRY_SECONDS`` on the running loop; ``on_state(reason)`` is called once when
    appends start failing and ``on_state(None)`` once they succeed again. The buffer is
    bounded by refusing work, not by dropping records: :attr:`saturated` is true while
    ``max_buffer`` bytes or more wait, and the data plane then answers new requests 503
    until the disk takes them (requests already admitted still record: they add one
    record each). ``max_buffer=None`` (tools, tests) never saturates.
    """

    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int = SEGMENT_BYTES,
        max_buffer: int | None = None,
        on_state: Callable[[str | None], object] | None = None,
    ) -> None:
        self._dir = directory
        self._segment_bytes = segment_bytes
        self._max_buffer = max_buffer
        self._on_state = on_state
        self._failing = False
        self._buffer = bytearray()
        self._pending = 0
        self._fd: int | None = None
        self._size = 0
        self._retry: asyncio.TimerHandle | None = None
        self.written = 0

    def record(self, event: dict[str, Any]) -> None:
        """Append one usage event (a dict of UsageRecord fields); never raises.

        While the disk refuses, it waits in memory for the next retry instead.
        """
        self._buffer += encode_event(event)
        self._buffer += b"\n"
        self._pending += 1
        if not self._failing:
            self._try_flush()

    def pending(self) -> int:
        """Records waiting for the disk."""
        return self._pending

    @property
    def saturated(self) -> bool:
        """Too much is waiting for the disk: take no new work until it drains."""
        return self._max_buffer is not None and len(self._buffer) >= self._max_buffer

    def _try_flush(self) -> None:
        self._retry = None
        try:
            self.flush_sync()
        except OSError as exc:
            # A full or failing disk: keep the records and retry; requests go on until the bound.
            if not self._failing:
                self._failing = True
                logger.error(
                    "appending usage records to the journal failed (%s); %d records kept in memory", exc, self._pending
                )
                if self._on_state is not None:
                    self._on_state(f"the usage journal cannot be written: {exc.strerror or exc}")
            self._schedule_retry()
            return
        if self._failing:
            self._failing = False
            logger.warning("appending usage records to the journal works again")
            if self._on_state is not None:
                self._on_state(None)

    def _schedule_retry(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a command, a test): the next flush_sync or close tries again
        self._retry = loop.call_later(RETRY_SECONDS, self._try_flush)

    def flush_sync(self) -> None:
        """Append what is buffered to the segment now (one ``write`` unless the disk is short)."""
        if not self._buffer:
            return
        fd = self._segment()
        view = memoryview(self._buffer)
        done = 0
        try:
            while done < len(view):
                done += os.write(fd, view[done:])
        finally:
            view.release()
            del self._buffer[:done]
            self._size += done
        self.written += self._pending
        self._pending = 0
        if self._size >= self._segment_bytes:
            self._close_segment()

    def _segment(self) -> int:
        if self._fd is not None:
            return self._fd
        private_directory(self._dir)
        name = f"{time.time_ns():020d}-{os.getpid()}"
        # Locked before it gets its .jsonl name, so a drainer never sees it unlocked and empty.
        tmp = self._dir / f"{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(tmp, self._dir / f"{name}.jsonl")
        self._fd, self._size = fd, 0
        return fd

    def _close_segment(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock: the drainer may now finish the segment
            self._fd = None

    def close(self) -> None:
        """Append what is left (no retry) and let go of the segment; see :meth:`aclose`."""
        self._stop_retry()
        try:
            self.flush_sync()
        except OSError as exc:
            self._give_up(exc)
        finally:
            self._close_segment()

    async def aclose(self, wait: float = CLOSE_WAIT_SECONDS) -> None:
        """At shutdown: append what is left, retrying for up to ``wait`` seconds, then let go.

        What the disk still refuses then cannot be kept on it: the records are logged
        (ERROR, one JSON object per line) so that an operator can put them back (as a
        ``.jsonl`` file in ``DATA_DIR/usage-spool``, which the usage writer drains).
        """
        self._stop_retry()
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    self.flush_sync()
                    return
                except OSError as exc:
                    if time.monotonic() >= deadline:
                        self._give_up(exc)
                        return
                await asyncio.sleep(RETRY_SECONDS)
        finally:
            self._close_segment()

    def _stop_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _give_up(self, exc: OSError) -> None:
        lost, self._buffer = bytes(self._buffer), bytearray()
        self._pending = 0
        logger.error(
            "%d usage records could not be appended to the journal at shutdown (%s); "
            "they are not on disk, here they are:\n%s",
            lost.count(b"\n"),
            exc,
            lost.decode(errors="replace"),
        )


class JournalDrainer:
    """Writes journal segments (and legacy spool files) to the database, then deletes them."""

    def __init__(
        self,
        directory: Path,
        writer: Writer = django_writer,
        *,
        batch: int = 500,
        extra_dirs: Sequence[Path] = (),
    ) -> None:
        self.directory = directory
        self._writer = writer
        self._batch = batch
        # Directories of finished files in the same format (the spool of earlier versions).
        self._extra_dirs = tuple(extra_dirs)
        self._offsets: dict[Path, int] = {}
        self._lock_fd: int | None = None
        self.written = 0
        self.dead = 0

    def acquire(self) -> bool:
        """Become the directory's active drainer, if no other process is."""
        if self._lock_fd is not None:
            return True
        private_directory(self.directory)
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def step(self) -> int:
        """Write what the journal holds now; return how many records were handled.

        Raises :class:`UsageWriteFailed` on an outage (what was written stays written).
        Returns 0 without reading when another process is the active drainer.
        """
        if not self.acquire():
            return 0
        handled = 0
        for path in self._files():
            handled += self._drain(path)
        return handled

    def drain(self, *, wait: float = 0.0) -> int:
        """Write everything, waiting up to ``wait`` seconds for writers to let go of segments."""
        deadline = time.monotonic() + wait
        total = self.step()
        while self._files() and time.monotonic() < deadline:
            time.sleep(0.05)
            total += self.step()
        return total

    def _files(self) -> list[Path]:
        files = sorted(self.directory.glob("*.jsonl")) if self.directory.is_dir() else []
        files = [path for path in files if path.name != DEAD_NAME]
        for extra in self._extra_dirs:
            if extra.is_dir():
                files += sorted(extra.glob("*.jsonl"))
        return files

    def _drain(self, path: Path) -> int:
        offset = self._offsets.get(path, 0)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below, after the lock test
        except FileNotFoundError:
            self._offsets.pop(path, None)
            return 0
        with handle:
            handled = self._consume(path, handle, offset)
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return handled  # its writer is still appending
            # No writer: what is there now is all there will be.
            handled += self._consume(path, handle, self._offsets[path], final=True)
            path.unlink()
            self._offsets.pop(path, None)
            return handled

    def _consume(self, path: Path, handle: Any, offset: int, *, final: bool = False) -> int:
        """Write the complete lines after ``offset``, moving the offset past each batch written."""
        handle.seek(offset)
        data = handle.read()
        end = data.rfind(b"\n") + 1
        lines = data[:end].split(b"\n")[:-1]
        handled = 0
        for start in range(0, len(lines), self._batch):
            chunk = lines[start : start + self._batch]
            self._write_lines(chunk)
            handled += len(chunk)
            offset += sum(len(line) + 1 for line in chunk)
            self._offsets[path] = offset
        self._offsets[path] = offset
        if final and end < len(data):
            # The writer died mid-append (its lock is gone): the tail will never be completed.
            logger.error("usage journal %s ends with a torn line (%d bytes); set aside", path.name, len(data) - end)
            self._bury_raw([data[end:]])
        return handled

    def _write_lines(self, lines: list[bytes]) -> None:
        events: list[dict[str, Any]] = []
        junk: list[bytes] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                events.append(decode_event(line))
            except ValueError:
                junk.append(line)
        if events:
            result = write_batch(self._writer, events)
            if result.outage is not None:
                # Offsets stay before this batch: what was written is written again (idempotent).
                raise UsageWriteFailed(str(result.outage)) from result.outage
            self.written += len(result.done)
            if result.bad:
                bad = [events[i] for i in result.bad]
                logger.error(
                    "the usage writer refused %d events (%s; first error: %s); set aside in %s",
                    len(bad),
                    ", ".join(str(event.get("request_id")) for event in bad[:10]),
                    result.reason,
                    self.directory / DEAD_NAME,
                )
                self._bury_raw([encode_event(event) for event in bad])
        if junk:
            # After the writes: an outage leaves the offset before these lines, and each retry
            # would set them aside once more.
            logger.error("%d usage journal lines are unreadable; set aside in %s", len(junk), DEAD_NAME)
            self._bury_raw(junk)

    def _bury_raw(self, lines: list[bytes]) -> None:
        self.dead += len(lines)
        with open(self.directory / DEAD_NAME, "ab") as dead:
            dead.write(b"".join(line + b"\n" for line in lines))


class JournalSource:
    """The journal as a :class:`gateway.metering.drain.Source` (steps run in a worker thread)."""

    name = "journal"

    def __init__(self, drainer: JournalDrainer) -> None:
        self.drainer = drainer

    async def step(self) -> int:
        return await asyncio.to_thread(self.drainer.step)

    async def finish(self, wait: float) -> None:
        drainer = self.drainer
        try:
            if drainer.acquire():  # else another process is the active drainer: it writes what is left
                await asyncio.to_thread(drainer.drain, wait=wait)
        finally:
            drainer.release()
