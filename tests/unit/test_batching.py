"""accounts.infra.batching.BackgroundFlush: the one background writer loop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from accounts.infra.batching import BackgroundFlush
from tests.harness import poll_async


class Queue:
    """An owner: a list of items, written by ``flush`` unless ``fail`` more attempts should fail."""

    def __init__(self, fail: int = 0) -> None:
        self.items: list[int] = []
        self.written: list[list[int]] = []
        self.fail = fail
        self.attempts = 0
        self.spills = 0

    async def flush(self) -> None:
        self.attempts += 1
        if self.fail:
            self.fail -= 1
            raise ConnectionError("down")
        batch, self.items = self.items, []
        if batch:
            self.written.append(batch)

    async def on_failure(self) -> None:
        self.spills += 1


def flusher(queue: Queue, **options: float) -> BackgroundFlush:
    return BackgroundFlush(
        queue.flush,
        pending=lambda: bool(queue.items),
        what="test items",
        on_failure=queue.on_failure,
        min_backoff=options.get("min_backoff", 0.001),
        max_backoff=0.004,
        linger=options.get("linger", 0.0),
    )


def test_a_kick_without_a_running_loop_does_nothing() -> None:
    queue = Queue()
    queue.items.append(1)
    flush = flusher(queue)
    flush.kick()
    assert not flush.running
    assert queue.attempts == 0


def test_what_is_queued_around_a_kick_is_written_in_one_batch() -> None:
    async def scenario() -> Queue:
        queue = Queue()
        flush = flusher(queue, linger=0.01)
        for i in range(5):
            queue.items.append(i)
            flush.kick()
        await poll_async(lambda: queue.written, what="a batch written")
        await flush.stop()
        assert not flush.running
        return queue

    queue = asyncio.run(scenario())
    assert queue.written == [[0, 1, 2, 3, 4]]


def test_failures_are_retried_logged_once_and_their_end_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[Queue, BackgroundFlush]:
        queue = Queue(fail=3)
        flush = flusher(queue)
        queue.items.append(7)
        flush.kick()
        await poll_async(lambda: queue.written, what="written after the failures")
        await flush.stop()
        return queue, flush

    with caplog.at_level(logging.WARNING, logger="accounts.infra.batching"):
        queue, flush = asyncio.run(scenario())
    assert queue.written == [[7]]
    assert (queue.attempts, flush.failures, queue.spills) == (4, 3, 3)
    assert not flush.failing
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["writing test items failed; retrying with a growing backoff", "writing test items works again"]


def test_stop_cancels_a_loop_that_keeps_failing_and_leaves_the_items_to_the_owner() -> None:
    async def scenario() -> Queue:
        queue = Queue(fail=10**9)
        flush = flusher(queue)
        queue.items.append(1)
        flush.kick()
        await poll_async(lambda: queue.attempts >= 3, what="retries")
        await flush.stop()
        assert not flush.running
        return queue

    queue = asyncio.run(scenario())
    assert queue.items == [1]
    assert queue.written == []
