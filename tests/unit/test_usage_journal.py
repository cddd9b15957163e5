"""The embedded path of metering (gateway/metering/journal.py): writer -> journal on disk -> drainer.

Plain unit tests on ``tmp_path``: the drainer's writer is a list-collecting callable
standing in for ``usage_records_write``, so no database is needed. A "writer holding a
segment" is either a :class:`JournalWriter` with its segment open or a file this test
keeps under ``flock``; an unlocked ``.jsonl`` file is one whose writer is gone.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.db import DataError, IntegrityError, OperationalError, ProgrammingError

from gateway.metering.codec import decode_event, encode_event
from gateway.metering.database import UsageWriteFailed
from gateway.metering.drain import drain
from gateway.metering.journal import DEAD_NAME, LOCK_NAME, JournalDrainer, JournalSource, JournalWriter
from tests import harness as live

T0 = datetime(2030, 1, 1, 12, 30, tzinfo=UTC)


def event(request_id: str, **extra: Any) -> dict[str, Any]:
    return {"request_id": request_id, "tenant_id": 1, "model": "m", "created_at": T0, **extra}


class ListWriter:
    """Collects what it is given; raises ``fail`` (while set) or ``refuse_with`` for ``refuse`` ids."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.calls: list[list[str]] = []
        self.fail: Exception | None = None
        self.fail_on_call: int | None = None  # 1-based: only that call raises ``fail``
        self.refuse: set[str] = set()
        self.refuse_with: Exception = IntegrityError("duplicate key value violates a constraint")

    def __call__(self, events: Sequence[dict[str, Any]]) -> int:
        self.calls.append([str(e["request_id"]) for e in events])
        if self.fail is not None and self.fail_on_call in (None, len(self.calls)):
            raise self.fail
        if any(e["request_id"] in self.refuse for e in events):
            raise self.refuse_with
        self.events.extend(events)
        return len(events)

    def ids(self) -> list[str]:
        return [str(e["request_id"]) for e in self.events]


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "usage-journal"


@pytest.fixture
def writers() -> Iterator[list[JournalWriter]]:
    """JournalWriters a test makes, closed at teardown (their segments stay locked until then)."""
    made: list[JournalWriter] = []
    yield made
    for writer in made:
        writer.close()


def segments(directory: Path) -> list[Path]:
    return sorted(path for path in directory.glob("*.jsonl") if path.name != DEAD_NAME)


def dead_lines(directory: Path) -> list[bytes]:
    path = directory / DEAD_NAME
    return path.read_bytes().splitlines() if path.exists() else []


def write_segment(directory: Path, name: str, data: bytes) -> Path:
    """A segment whose writer is gone (no lock held)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


def lines(*request_ids: str) -> bytes:
    return b"".join(encode_event(event(request_id)) + b"\n" for request_id in request_ids)


# --- the writer and the drainer together ------------------------------------------------------


def test_records_come_back_once_in_order_with_strings_for_datetimes_and_decimals(
    journal: Path, writers: list[JournalWriter]
) -> None:
    writer = JournalWriter(journal)
    writers.append(writer)
    sent = [event(f"req_{i}", cost=Decimal("0.000123") * i, latency_ms=1.5 * i, attempts=[{"n": i}]) for i in range(6)]
    for item in sent:
        writer.record(item)
    writer.flush_sync()
    collected = ListWriter()
    drainer = JournalDrainer(journal, collected)

    assert drainer.step() == 6
    assert collected.ids() == [f"req_{i}" for i in range(6)]
    first = collected.events[1]
    assert first["created_at"] == "2030-01-01T12:30:00+00:00"
    assert first["cost"] == "0.000123"
    assert first["latency_ms"] == 1.5
    assert first["attempts"] == [{"n": 1}]
    assert collected.events == [decode_event(encode_event(item)) for item in sent]
    # Nothing new: nothing written again, however often the drainer looks.
    assert drainer.step() == 0
    writer.close()
    assert drainer.step() == 0
    assert collected.ids() == [f"req_{i}" for i in range(6)]
    assert (drainer.written, drainer.dead, writer.written) == (6, 0, 6)
    assert segments(journal) == []


def test_a_held_segment_is_read_incrementally_and_deleted_only_once_released(
    journal: Path, writers: list[JournalWriter]
) -> None:
    writer = JournalWriter(journal)
    writers.append(writer)
    collected = ListWriter()
    drainer = JournalDrainer(journal, collected)

    writer.record(event("a"))
    writer.flush_sync()
    assert drainer.step() == 1
    [segment] = segments(journal)
    assert segment.name.endswith(f"-{os.getpid()}.jsonl")

    writer.record(event("b"))
    writer.record(event("c"))
    writer.flush_sync()
    assert drainer.step() == 2
    assert collected.ids() == ["a", "b", "c"]
    assert segments(journal) == [segment], "deleted while its writer holds it"

    writer.record(event("d"))
    writer.close()  # appends d, then lets go of the segment
    assert drainer.step() == 1
    assert collected.ids() == ["a", "b", "c", "d"]
    assert segments(journal) == []
    assert not (journal / DEAD_NAME).exists()


def test_a_partial_line_of_a_held_segment_waits_for_its_end(journal: Path) -> None:
    journal.mkdir(parents=True)
    path = journal / "00000000000000000001-1.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        whole = encode_event(event("b")) + b"\n"
        os.write(fd, lines("a") + whole[:10])
        collected = ListWriter()
        drainer = JournalDrainer(journal, collected)
        assert drainer.step() == 1
        assert collected.ids() == ["a"]
        os.write(fd, whole[10:])
        assert drainer.step() == 1
        assert collected.ids() == ["a", "b"]
        assert path.exists()
    finally:
        os.close(fd)
    assert drainer.step() == 0
    assert not path.exists()
    assert collected.ids() == ["a", "b"]
    assert dead_lines(journal) == []


def test_rotation_makes_several_segments_and_all_are_drained(journal: Path, writers: list[JournalWriter]) -> None:
    line = len(encode_event(event("req_00"))) + 1
    per_segment = -(-300 // line)  # a segment is closed once it holds 300 bytes or more
    count = 3 * per_segment + 1
    writer = JournalWriter(journal, segment_bytes=300)
    writers.append(writer)
    for i in range(count):
        writer.record(event(f"req_{i:02d}"))
        writer.flush_sync()
    made = segments(journal)
    assert [len(path.read_bytes().splitlines()) for path in made] == [per_segment, per_segment, per_segment, 1]
    expected = [f"req_{i:02d}" for i in range(count)]
    collected = ListWriter()
    drainer = JournalDrainer(journal, collected)
    assert drainer.step() == count
    assert collected.ids() == expected
    assert segments(journal) == made[-1:], "the current segment is still held"
    writer.close()
    assert drainer.step() == 0
    assert segments(journal) == []
    assert collected.ids() == expected


def test_close_starts_no_empty_segment_and_a_new_record_opens_a_new_one(
    journal: Path, writers: list[JournalWriter]
) -> None:
    writer = JournalWriter(journal)
    writers.append(writer)
    writer.close()
    assert not journal.exists() or segments(journal) == []
    writer.record(event("a"))
    writer.close()
    [segment] = segments(journal)
    collected = ListWriter()
    assert JournalDrainer(journal, collected).step() == 1
    assert collected.ids() == ["a"]
    assert not segment.exists()


# --- lines that cannot be written -------------------------------------------------------------


def test_a_torn_last_line_of_an_unlocked_segment_is_set_aside(journal: Path) -> None:
    torn = encode_event(event("c"))[:25]
    path = write_segment(journal, "00000000000000000001-1.jsonl", lines("a", "b") + torn)
    collected = ListWriter()
    drainer = JournalDrainer(journal, collected)
    assert drainer.step() == 2
    assert collected.ids() == ["a", "b"]
    assert dead_lines(journal) == [torn]
    assert drainer.dead == 1
    assert not path.exists()
    # dead.jsonl is no segment: it is not drained.
    assert drainer.step() == 0
    assert collected.ids() == ["a", "b"]
    assert dead_lines(journal) == [torn]


def test_unreadable_lines_are_set_aside_and_the_others_written(journal: Path) -> None:
    data = lines("a") + b"not json\n" + b"[1, 2]\n" + b"\n" + lines("b") + b'{"request_id": \n' + lines("c")
    write_segment(journal, "00000000000000000001-1.jsonl", data)
    collected = ListWriter()
    drainer = JournalDrainer(journal, collected)
    drainer.step()
    assert collected.ids() == ["a", "b", "c"]
    assert dead_lines(journal) == [b"not json", b"[1, 2]", b'{"request_id": ']
    assert (drainer.written, drainer.dead) == (3, 3)
    assert segments(journal) == []


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError("database unreachable"),
        OperationalError("database is locked"),
        ProgrammingError("no table"),
    ],
    ids=["oserror", "operational", "programming"],
)
def test_an_outage_keeps_the_records_for_a_later_step(journal: Path, error: Exception) -> None:
    write_segment(journal, "00000000000000000001-1.jsonl", lines("a", "b", "c"))
    collected = ListWriter()
    collected.fail = error
    drainer = JournalDrainer(journal, collected)
    with pytest.raises(UsageWriteFailed):
        drainer.step()
    with pytest.raises(UsageWriteFailed):
        drainer.step()
    assert collected.events == []
    assert segments(journal) != []
    collected.fail = None
    assert drainer.step() == 3
    assert collected.ids() == ["a", "b", "c"]
    assert segments(journal) == []
    assert dead_lines(journal) == []
    assert drainer.dead == 0


def test_an_outage_mid_segment_moves_the_offset_past_written_batches_only(
    journal: Path, writers: list[JournalWriter]
) -> None:
    writer = JournalWriter(journal)
    writers.append(writer)
    for name in "abcde":
        writer.record(event(name))
    writer.flush_sync()
    collected = ListWriter()
    collected.fail, collected.fail_on_call = OperationalError("server closed the connection"), 2
    drainer = JournalDrainer(journal, collected, batch=2)
    with pytest.raises(UsageWriteFailed):
        drainer.step()
    assert collected.ids() == ["a", "b"]
    collected.fail = None
    writer.record(event("f"))
    writer.close()
    assert drainer.step() == 4
    # c and d were retried, a and b not written twice, f after them.
    assert collected.ids() == ["a", "b", "c", "d", "e", "f"]
    assert collected.calls == [["a", "b"], ["c", "d"], ["c", "d"], ["e", "f"]]
    assert segments(journal) == []


def test_a_restarted_drainer_reads_segments_from_the_start(journal: Path, writers: list[JournalWriter]) -> None:
    """Offsets live in memory: a new drainer writes a held segment again (the writer is idempotent)."""
    writer = JournalWriter(journal)
    writers.append(writer)
    writer.record(event("a"))
    writer.flush_sync()
    first = ListWriter()
    drainer = JournalDrainer(journal, first)
    assert drainer.step() == 1
    drainer.release()
    second = ListWriter()
    assert JournalDrainer(journal, second).step() == 1
    assert second.ids() == ["a"]


@pytest.mark.parametrize(
    "error",
    [IntegrityError("foreign key violated"), DataError("value too long"), ValueError("bad event")],
    ids=["integrity", "data", "other"],
)
def test_an_event_refused_for_its_data_is_set_aside_alone(journal: Path, error: Exception) -> None:
    write_segment(journal, "00000000000000000001-1.jsonl", lines("a", "b", "c", "d"))
    collected = ListWriter()
    collected.refuse, collected.refuse_with = {"c"}, error
    drainer = JournalDrainer(journal, collected)
    assert drainer.step() == 4
    assert collected.ids() == ["a", "b", "d"]
    # The batch, then one by one.
    assert collected.calls == [["a", "b", "c", "d"], ["a"], ["b"], ["c"], ["d"]]
    assert [decode_event(line) for line in dead_lines(journal)] == [decode_event(encode_event(event("c")))]
    assert (drainer.written, drainer.dead) == (3, 1)
    assert segments(journal) == []
    # Set aside for good: not tried again.
    assert drainer.step() == 0
    assert len(collected.calls) == 5


def test_an_outage_during_the_one_by_one_pass_keeps_everything_unwritten(journal: Path) -> None:
    write_segment(journal, "00000000000000000001-1.jsonl", lines("a", "b", "c"))
    collected = ListWriter()
    collected.refuse = {"a"}
    collected.fail, collected.fail_on_call = OperationalError("connection lost"), 3  # the write of "b" alone
    drainer = JournalDrainer(journal, collected)
    with pytest.raises(UsageWriteFailed):
        drainer.step()
    assert collected.events == []
    assert dead_lines(journal) == []
    collected.fail = None
    drainer.step()
    assert collected.ids() == ["b", "c"]
    assert [decode_event(line)["request_id"] for line in dead_lines(journal)] == ["a"]
    assert segments(journal) == []


def test_unreadable_lines_are_set_aside_once_through_an_outage(journal: Path) -> None:
    write_segment(journal, "00000000000000000001-1.jsonl", lines("a") + b"garbage\n" + lines("b"))
    collected = ListWriter()
    collected.fail = ConnectionResetError("database gone")
    drainer = JournalDrainer(journal, collected)
    for _ in range(3):
        with pytest.raises(UsageWriteFailed):
            drainer.step()
    collected.fail = None
    drainer.step()
    assert collected.ids() == ["a", "b"]
    assert dead_lines(journal) == [b"garbage"]
    assert drainer.dead == 1


# --- one active drainer per directory ---------------------------------------------------------


def test_a_second_drainer_stands_by_until_the_first_releases(journal: Path) -> None:
    write_segment(journal, "00000000000000000001-1.jsonl", lines("a", "b"))
    first, second = ListWriter(), ListWriter()
    active = JournalDrainer(journal, first)
    standby = JournalDrainer(journal, second)
    assert active.acquire()
    assert (journal / LOCK_NAME).exists()
    assert not standby.acquire()
    assert standby.step() == 0
    assert second.events == []
    assert segments(journal) != [], "the standby drainer must not touch the journal"
    assert active.acquire(), "acquire is idempotent for the holder"

    active.release()
    assert standby.step() == 2
    assert second.ids() == ["a", "b"]
    assert first.events == []
    assert not active.acquire()
    assert active.step() == 0
    standby.release()
    assert active.acquire()
    active.release()


def test_legacy_spool_files_are_drained_and_removed(tmp_path: Path, journal: Path) -> None:
    spool = tmp_path / "usage-spool"
    spool.mkdir()
    # Earlier versions' spool: whole files of JSON lines, written to .tmp and renamed.
    (spool / "1700000000000000000-aa.jsonl").write_bytes(lines("s1", "s2"))
    (spool / "1700000000000000001-bb.jsonl").write_bytes(lines("s3"))
    unfinished = spool / "1700000000000000002-cc.tmp"
    unfinished.write_bytes(lines("s4"))
    write_segment(journal, "00000000000000000001-1.jsonl", lines("j1"))
    collected = ListWriter()
    drainer = JournalDrainer(journal, collected, extra_dirs=[spool, tmp_path / "missing"])
    assert drainer.step() == 4
    assert collected.ids() == ["j1", "s1", "s2", "s3"]
    assert sorted(path.name for path in spool.iterdir()) == [unfinished.name]
    assert segments(journal) == []
    assert not (spool / DEAD_NAME).exists()
    assert not (journal / DEAD_NAME).exists()


def test_drain_writes_everything_released(journal: Path, writers: list[JournalWriter]) -> None:
    writer = JournalWriter(journal, segment_bytes=200)
    writers.append(writer)
    for i in range(8):
        writer.record(event(f"req_{i}"))
    writer.close()
    collected = ListWriter()
    drainer = JournalDrainer(journal, collected, batch=3)
    assert drainer.drain() == 8
    assert collected.ids() == [f"req_{i}" for i in range(8)]
    assert segments(journal) == []


# --- the writer ------------------------------------------------------------------------------


def test_each_record_is_in_the_segment_when_record_returns(journal: Path, writers: list[JournalWriter]) -> None:
    """No event loop needed and no flush: a SIGKILL right after ``record`` loses nothing."""
    writer = JournalWriter(journal)
    writers.append(writer)
    assert not journal.exists(), "no segment before the first record"
    writer.record(event("a"))
    [segment] = segments(journal)
    assert [decode_event(line)["request_id"] for line in segment.read_bytes().splitlines()] == ["a"]
    writer.record(event("b"))
    assert [decode_event(line)["request_id"] for line in segment.read_bytes().splitlines()] == ["a", "b"]
    assert (writer.pending(), writer.written) == (0, 2)
    writer.close()
    collected = ListWriter()
    JournalDrainer(journal, collected).step()
    assert collected.ids() == ["a", "b"]
    assert segments(journal) == []


def test_the_drain_loop_writes_until_stopped_then_a_last_pass(journal: Path) -> None:
    """The drain loop over the journal, with a writer in the same loop."""
    collected = ListWriter()

    async def scenario() -> None:
        writer = JournalWriter(journal)
        drainer = JournalDrainer(journal, collected)
        stop = asyncio.Event()
        task = asyncio.create_task(drain(JournalSource(drainer), stop, idle=0.01))
        writer.record(event("a"))
        await live.poll_async(lambda: collected.ids() == ["a"])
        writer.record(event("b"))
        await writer.aclose()
        stop.set()
        await task
        assert collected.ids() == ["a", "b"]
        assert segments(journal) == []
        # It let go of the directory.
        other = JournalDrainer(journal, ListWriter())
        assert other.acquire()
        other.release()

    asyncio.run(scenario())


# --- a full disk (a real tmpfs; skipped where it cannot be mounted) ---------------------------


@pytest.fixture
def full_journal(journal: Path) -> Iterator[Path]:
    """The journal directory on a tmpfs with no byte left (``filler`` takes it all)."""
    with live.tmpfs(journal, "64k"):
        live.fill(journal / "filler")
        yield journal


def test_a_full_disk_holds_records_up_to_the_bound_reports_once_and_catches_up(full_journal: Path) -> None:
    states: list[str | None] = []

    async def scenario() -> list[str]:
        writer = JournalWriter(full_journal, max_buffer=4096, on_state=states.append)
        sent: list[str] = []
        while not writer.saturated:
            sent.append(f"r{len(sent)}")
            writer.record(event(sent[-1]))
            await asyncio.sleep(0)
        assert writer.pending() == len(sent), "every record is held"
        assert writer.written == 0
        assert states == ["the usage journal cannot be written: No space left on device"]
        (full_journal / "filler").unlink()
        await live.poll_async(lambda: writer.pending() == 0)  # the next retry appends them
        assert not writer.saturated
        assert states[-1] is None
        await writer.aclose()
        return sent

    sent = asyncio.run(scenario())
    assert len(sent) >= 2
    assert len(states) == 2, "reported once down, once up"
    collected = ListWriter()
    JournalDrainer(full_journal, collected).step()
    assert collected.ids() == sent


def test_what_the_disk_still_refuses_at_shutdown_is_logged_not_dropped_silently(
    full_journal: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        writer = JournalWriter(full_journal)
        for request_id in ("x1", "x2", "x3"):
            writer.record(event(request_id))
        await writer.aclose(wait=0)
        assert writer.pending() == 0

    asyncio.run(scenario())
    [message] = [r.getMessage() for r in caplog.records if "could not be appended" in r.getMessage()]
    assert message.startswith("3 usage records could not be appended to the journal at shutdown")
    logged = [decode_event(line.encode()) for line in message.split("\n")[1:] if line]
    assert [e["request_id"] for e in logged] == ["x1", "x2", "x3"]


def test_a_short_write_on_a_filling_disk_is_completed_later_without_a_torn_line(journal: Path) -> None:
    """The disk takes the part of a record that fits in the segment's last page, then refuses:
    the rest is kept and appended once there is room, so the line is whole and not doubled."""
    with live.tmpfs(journal, "64k"):
        writer = JournalWriter(journal)
        writer.record(event("a", model="m" * 3800))  # most of the segment's first page
        [segment] = segments(journal)
        live.fill(journal / "filler")
        writer.record(event("b", model="m" * 600))  # ~200 bytes fit in that page, not the rest
        assert writer.pending() == 1
        assert not segment.read_bytes().endswith(b"\n"), "a short write"
        (journal / "filler").unlink()
        writer.close()
        assert writer.written == 2
        collected = ListWriter()
        drainer = JournalDrainer(journal, collected)
        drainer.step()
        assert collected.ids() == ["a", "b"]
        assert drainer.dead == 0
