"""A full disk under the usage journal (embedded metering), on a real tmpfs.

The gateway's journal directory is a tiny tmpfs filled to the last byte: appends fail
with ENOSPC. The gateway keeps the records in memory up to ``GATEWAY_USAGE_BUFFER_BYTES``,
then answers new requests 503 (it takes no work it could not meter) instead of letting
the buffer grow; once the disk has room, the records are appended and written, and it
serves again. Mounting needs root (CAP_SYS_ADMIN): elsewhere the test is skipped.

The gateway runs without Redis whatever the session's mode (the journal is the embedded
path); its database is the session's, so in PostgreSQL mode the records land there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from tests import harness as live
from tests.conftest import MODEL, Live
from tests.live.test_live_usage_writer import gateway_env, recorded

BUFFER_BYTES = 64 * 1024  # ~130 records (one is ~0.5 KB of JSON)


def ask(gateway: live.LiveProcess, key: str, text: str) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/responses",
        json={"model": MODEL, "input": text},
        headers={"authorization": f"Bearer {key}"},
        timeout=20,
    )


def test_a_full_journal_disk_bounds_the_buffer_refuses_new_work_and_loses_nothing(
    live_gw: Live, start_gateway: Callable[..., live.LiveProcess], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    with live.tmpfs(data / "usage-journal", "256k") as journal:
        live.fill(journal / "filler")
        gateway = start_gateway(**gateway_env(data, REDIS_URL="", GATEWAY_USAGE_BUFFER_BYTES=str(BUFFER_BYTES)))
        key = live_gw.owner.key

        # Served while the records fit in memory, then refused: the buffer is bounded.
        served: list[str] = []
        refused: httpx.Response | None = None
        for i in range(1000):
            response = ask(gateway, key, f"n{i}")
            if response.status_code != 200:
                refused = response
                break
            served.append(response.headers["x-request-id"])
        assert refused is not None, f"{len(served)} requests served with nothing appended: the buffer is unbounded"
        assert len(served) >= 10
        for i in range(20):
            response = ask(gateway, key, f"refused {i}")
            live.assert_error(response, 503, "usage_backlog", type="server_error")
            assert int(response.headers["retry-after"]) >= 1
        assert recorded(served) == set()
        log = gateway.log.read_text()
        # Reported once (readiness and the journal's own error), not once per request.
        assert log.count("journal is unavailable: the usage journal cannot be written: No space left on device") == 1
        assert log.count("appending usage records to the journal failed") == 1

        # Room on the disk again: the records are appended and written, requests are served.
        (journal / "filler").unlink()
        after = live.poll(lambda: ask(gateway, key, "after").status_code == 200, timeout=15, what="serving again")
        assert after
        live.poll(lambda: recorded(served) == set(served), timeout=20, what="every served request recorded")
        assert "journal is available again" in gateway.log.read_text()
        assert gateway.stop() in (0, -15)
