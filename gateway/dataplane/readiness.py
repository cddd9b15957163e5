"""What this process's dependencies are doing right now, for readiness and for logs.

Every part that talks to a dependency (Redis, the database, the usage writer, the disk
under the journal) reports it here: :meth:`Readiness.down` when a call fails,
:meth:`Readiness.up` when one succeeds again. A state change is logged once (one
warning when a dependency goes down, one line when it is back), not once per request,
so an outage under load does not flood the log. :meth:`Readiness.report` is what the
readiness endpoint answers.

Contract: ``down``/``up`` are cheap (a dict lookup when nothing changes) and never raise,
so they may be called on the hot path.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("gateway.readiness")


class Readiness:
    """Dependency name -> (since, reason) for those that are down."""

    def __init__(self) -> None:
        self._down: dict[str, tuple[float, str]] = {}

    def down(self, name: str, reason: str) -> None:
        """``name`` failed (``reason``: one line, no secrets). Logged when it was up before."""
        if name not in self._down:
            self._down[name] = (time.time(), reason)
            logger.warning("%s is unavailable: %s", name, reason)

    def up(self, name: str) -> None:
        """``name`` answered again. Logged when it was down."""
        entry = self._down.pop(name, None)
        if entry is not None:
            logger.warning("%s is available again after %.1fs", name, time.time() - entry[0])

    def is_down(self, name: str) -> bool:
        return name in self._down

    @property
    def ready(self) -> bool:
        return not self._down

    def report(self) -> dict[str, object]:
        """``{"status": "ok"|"degraded", "down": {name: {"since", "reason"}}}``."""
        return {
            "status": "ok" if not self._down else "degraded",
            "down": {name: {"since": since, "reason": reason} for name, (since, reason) in sorted(self._down.items())},
        }
