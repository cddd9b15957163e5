"""Where the limiter meets the database: budget seeds in, budget alerts out.

Both run off the request path: a seed when a budget counter is first needed (batched by
:class:`gateway.limits.seeding.BatchSeed`), an alert when a budget threshold is crossed
(recorded in a task, retried while the database fails, since it fires only once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.db import DatabaseError

from gateway.conf.db import db_call
from gateway.limits.engine import Scope
from tenancy import selectors
from tenancy.pricing import budget_window, micros_to_usd
from tenancy.services.alerts import budget_alert_record

logger = logging.getLogger(__name__)


async def budget_spent_many(
    scope: str, ids: Sequence[int], start: datetime, end: datetime
) -> dict[int, tuple[int, Decimal]]:
    """What the database says these scopes spent in their budget window (after a restart)."""
    spent: dict[int, tuple[int, Decimal]] = await db_call(selectors.budget_spent_many)(scope, ids, start, end)
    return spent


# An alert fires once per scope, window and kind: a failed write (a database outage, a
# locked SQLite file) is retried with backoff for this long rather than lost.
ALERT_RETRY_SECONDS = 600.0


def _record_alert(scope: Scope, kind: str, spent_tokens: int, spent_micros: int, window_start: int) -> None:
    """Record the alert; ``budget_alert_record`` queues its webhook delivery (once) when configured."""
    start = datetime.fromtimestamp(window_start, UTC)
    end = datetime.fromtimestamp(scope.window_end, UTC) if scope.window_end else budget_window("month", start)[1]
    budget_alert_record(
        scope=scope.name,
        scope_id=scope.id,
        tenant_id=scope.tenant_id or scope.id,
        kind=kind,
        period_start=start,
        period_end=end,
        spent_usd=micros_to_usd(spent_micros),
        spent_tokens=spent_tokens,
        limit_usd=micros_to_usd(scope.budget_micros) if scope.budget_micros is not None else None,
        limit_tokens=scope.budget_tokens,
    )


async def record_alert_retrying(*args: Any) -> None:
    """:func:`_record_alert`, retried while the database fails (it is idempotent)."""
    record = db_call(_record_alert)
    deadline = time.monotonic() + ALERT_RETRY_SECONDS
    delay = 0.1
    while True:
        try:
            await record(*args)
            return
        except (DatabaseError, OSError):
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("recording a budget alert failed; retrying in %.1fs", delay, exc_info=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
