"""The bookkeeping of one request: who, what, which accounts, and its usage record."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from accounts.upstream.account import AccountInfo
from gateway.config.snapshot import KeyInfo
from tenancy.pricing import Price, cost_usd, unknown_usage


class Exchange:
    """One request from arrival to its usage event; filled in as the request goes."""

    __slots__ = (
        "account",
        "attempt_seconds",
        "attempt_started",
        "attempts",
        "body_bytes",
        "client_gone",
        "deferred",
        "error_code",
        "final",
        "headers",
        "key",
        "model",
        "planned",
        "price",
        "refused_by",
        "request_id",
        "rid",
        "started",
        "stream",
        "upstream_model",
    )

    def __init__(self, request_id: str, started: float) -> None:
        self.request_id = request_id
        self.rid = request_id.encode()
        self.started = started
        self.key: KeyInfo | None = None
        self.model = ""
        self.stream = False
        self.account: AccountInfo | None = None
        self.price: Price | None = None
        self.attempts: list[dict[str, Any]] = []
        # (status, outcome, usage, response_id, ttfb_ms) once the request is answered.
        self.final: tuple[int, str, dict[str, int | None], str, float | None] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body_bytes = 0  # size of the request body
        self.client_gone = False  # the client disconnected before its answer was complete
        # For metrics, logs and traces (gateway/observability/): whether ``model`` passed the
        # plan (a known, allowed model: safe as a label), the upstream model of the last attempt,
        # the error code answered, the limit that refused ("key.rpm"...), when the attempt under
        # way started (0.0: none) and how long each failed attempt took (seconds).
        self.planned = False
        self.upstream_model = ""
        self.error_code = ""
        self.refused_by = ""
        self.attempt_started = 0.0
        self.attempt_seconds: list[float] = []
        # A background response (gateway/dataplane/stateful.py): metered when its task ends.
        self.deferred = False

    @property
    def tenant_id(self) -> int:
        return self.key.tenant_id if self.key is not None else 0

    def note_attempt(self, account_id: int, outcome: str, status: int, usage: dict[str, int | None] | None) -> None:
        """A failed attempt: recorded with the request, its usage billed too."""
        self.attempts.append({"account_id": account_id, "outcome": outcome, "status": status, **(usage or {})})
        self.attempt_seconds.append(time.monotonic() - self.attempt_started if self.attempt_started else 0.0)
        self.attempt_started = 0.0

    def finish(
        self,
        status: int,
        outcome: str,
        usage: dict[str, int | None] | None = None,
        *,
        response_id: str = "",
        ttfb_ms: float | None = None,
    ) -> None:
        self.final = (status, outcome, usage if usage is not None else unknown_usage(), response_id, ttfb_ms)

    def client_left(self) -> None:
        """The client went away: the record says ``client_disconnected``, with the status and
        usage of the answer it was being sent if there was one (billed: the upstream served it)."""
        self.client_gone = True
        if self.final is None:
            self.finish(499, "client_disconnected")
        else:
            status, _, usage, response_id, ttfb_ms = self.final
            self.final = (status, "client_disconnected", usage, response_id, ttfb_ms)

    def billed(self) -> tuple[int | None, Decimal | None]:
        """Tokens and cost of the final answer plus failed attempts; None when unknown."""
        usages = [attempt for attempt in self.attempts if attempt.get("total_tokens") is not None]
        if self.final is not None:
            usages.append(self.final[2])
        tokens: int | None = None
        cost: Decimal | None = None
        for usage in usages:
            if usage.get("total_tokens") is not None:
                tokens = (tokens or 0) + int(usage["total_tokens"])
            if self.price is not None:
                amount = cost_usd(usage, self.price)
                if amount is not None:
                    cost = (cost or Decimal(0)) + amount
        return tokens, cost

    def event(self, cost: Decimal | None, now: float | None = None) -> dict[str, Any]:
        """The usage event of this request (a dict of UsageRecord fields); ``now``: its end
        (``time.monotonic()``), the one the metrics use too."""
        assert self.key is not None
        status, outcome, usage, response_id, ttfb = self.final or (500, "failed", unknown_usage(), "", None)
        event: dict[str, Any] = {
            "request_id": self.request_id,
            "tenant_id": self.key.tenant_id,
            "api_key_id": self.key.key_id,
            "account_id": self.account.account_id if self.account else None,
            "model": self.model,
            "status_code": status,
            "outcome": outcome,
            "stream": self.stream,
            "response_id": response_id,
            "latency_ms": ((now if now is not None else time.monotonic()) - self.started) * 1000,
            "ttfb_ms": ttfb,
            "created_at": datetime.now(UTC),
            "cost": str(cost) if cost is not None and self.final is not None and outcome != "rejected" else None,
            "price_version_id": self.price.id if self.price is not None else None,
            "attempts": self.attempts,
        }
        event.update(usage)
        return event
