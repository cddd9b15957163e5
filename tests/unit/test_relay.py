"""gateway.dataplane.relay.SseRelay's frame splitting: exact, linear, bounded (issue 10 item 16)."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from accounts.upstream.client import UpstreamTooLarge
from gateway.dataplane.relay import SseRelay


async def _discard(message: dict[str, Any]) -> None:
    pass


def split_all(relay: SseRelay, chunks: list[bytes]) -> list[bytes]:
    out = [relay._split(c) for c in chunks]
    return [o for o in out if o is not None]


def frames_of(pieces: list[bytes]) -> list[bytes]:
    return [f for f in b"".join(pieces).split(b"\n\n") if f]


STREAM = b"".join(
    b'event: e%d\ndata: {"type": "e%d", "n": %d}\n\n' % (i, i, i) + (b": keep-alive\n\n" if i % 7 == 0 else b"")
    for i in range(200)
)


@pytest.mark.parametrize("seed", range(20))
def test_frames_come_out_whole_however_the_stream_is_cut(seed: int) -> None:
    rng = random.Random(seed)
    data = STREAM.replace(b"\n", b"\r\n") if seed % 2 else STREAM
    cuts = sorted(rng.sample(range(1, len(data)), 60))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    relay = SseRelay(_discard, 0.0)
    out = split_all(relay, chunks)
    # Each output ends at a frame boundary; together they are the stream (CRLF made LF).
    assert all(o.endswith(b"\n\n") for o in out)
    assert b"".join(out) == STREAM
    assert frames_of(out) == frames_of([STREAM])


def test_a_crlf_cut_between_cr_and_lf_still_ends_a_frame() -> None:
    relay = SseRelay(_discard, 0.0)
    assert split_all(relay, [b"data: 1\r\n\r", b"\ndata: 2\r", b"\n\r\n"]) == [b"data: 1\n\n", b"data: 2\n\n"]


def test_a_partial_frame_over_the_cap_is_refused() -> None:
    relay = SseRelay(_discard, 0.0, max_frame=64 * 1024)
    relay._split(b"data: ok\n\n")
    relay._split(b"data: " + b"x" * 60_000)
    with pytest.raises(UpstreamTooLarge, match="over 65536 bytes"):
        relay._split(b"x" * 10_000)


def test_a_16_mib_frame_in_16_kib_chunks_is_split_once() -> None:
    """The probe of item 16 (16 MiB without a boundary, in 16 KiB chunks): correct and linear.

    The CPU time is printed, not asserted (``pytest -s``): before the fix, each chunk re-copied
    and re-searched everything buffered (8.6 s measured); now each byte is handled once.
    """
    relay = SseRelay(_discard, 0.0, max_frame=17 * 1024 * 1024)
    piece = b"x" * 16384
    started = time.process_time()
    for _ in range(1024):
        assert relay._split(piece) is None
    out = relay._split(b"\n\n")
    elapsed = time.process_time() - started
    assert out is not None
    assert len(out) == 16 * 1024 * 1024 + 2
    print(f"16 MiB frame in 16 KiB chunks: {elapsed * 1000:.1f} ms of CPU")
