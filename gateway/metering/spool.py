"""Whole files of usage events on disk, for when nothing else will take them.

The Redis sink spools here what Redis refused at shutdown (or beyond its buffer while
Redis is down) and replays it into the stream later. A file is written to a temporary
name, fsynced and renamed, so it is there whole or not at all; it is removed only after
its events were handed on, so a crash in between repeats an idempotent write.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway.conf.files import private_directory
from gateway.metering.codec import decode_event, encode_event

logger = logging.getLogger(__name__)


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def write(self, events: Sequence[dict[str, Any]]) -> None:
        """Write ``events`` as one file (JSON lines); raises OSError when the disk refuses."""
        if not events:
            return
        private_directory(self.directory)
        path = self.directory / f"{time.time_ns()}-{uuid.uuid4().hex}.jsonl"
        tmp = path.with_suffix(".tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "wb") as handle:
            handle.write(b"".join(encode_event(event) + b"\n" for event in events))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def has_files(self) -> bool:
        return self.directory.is_dir() and any(self.directory.glob("*.jsonl"))

    def replay(self, send: Callable[[Sequence[dict[str, Any]]], object]) -> int:
        """Hand every spooled file to ``send``, oldest first, removing each once sent."""
        if not self.directory.is_dir():
            return 0
        count = 0
        for path in sorted(self.directory.glob("*.jsonl")):
            events = [decode_event(line) for line in path.read_bytes().splitlines() if line.strip()]
            if events:
                send(events)
            path.unlink()
            count += len(events)
        if count:
            logger.info("replayed %d spooled usage records", count)
        return count
