"""``GET /v1/usage``: a key's own usage and what is left of each limit that applies to it.

Never pool-wide or upstream figures: the usage is the key's own records; the limits are
the key's and its tenant's, as the limiter counts them now. Not the hot path: it reads
the database (two aggregates) in a worker thread and keeps the figures per key and budget
window for ``USAGE_CACHE_SECONDS`` (5 s, ``Runtime.usage_cache``): records written meanwhile
show after that, the limits are always current. Each call counts against the key's and its
tenant's requests per minute like any request (429 ``rate_limit_exceeded`` past them), so
polling it cannot load the database more than the keys' rates allow.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from gateway.conf.db import db_call
from gateway.dataplane.asgi_io import Scope, Send, send_json
from gateway.dataplane.auth import authenticate
from gateway.dataplane.exchange import Exchange
from gateway.dataplane.runtime import Runtime
from gateway.limits.engine import Scope as LimitScope
from gateway.limits.engine import rejection_error
from tenancy.pricing import budget_window
from tenancy.selectors import usage_summary


def _jsonable(summary: dict[str, Any]) -> dict[str, Any]:
    return {name: (str(value) if isinstance(value, Decimal) else value) for name, value in summary.items()}


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def requests_only(scopes: Sequence[LimitScope]) -> list[LimitScope]:
    """The scopes' requests-per-minute limits alone: a usage call reserves no tokens, no
    concurrency slot and no budget (a key over its budget can still read its usage)."""
    return [
        dataclasses.replace(scope, tpm=None, concurrency=None, budget_tokens=None, budget_micros=None)
        for scope in scopes
    ]


async def usage(scope: Scope, send: Send, runtime: Runtime, ex: Exchange) -> None:
    await runtime.fresh_token()
    await runtime.config.current()  # applies the changes announced since the last request
    key = await authenticate(scope, runtime.config.keys)
    now = time.time()
    decision = await runtime.limiter.admit(requests_only(key.scopes(now)), tokens=0, now=now)
    if not decision.allowed or decision.ticket is None:
        raise rejection_error(decision)
    runtime.limiter.settle(decision.ticket, tokens=0, micros=0)
    window = None
    for limits in (key.key_limits, key.tenant_limits):
        if limits is not None and (limits.budget_micros is not None or limits.budget_tokens is not None):
            window = limits.window(now)
            break
    if window is None:
        start, end = budget_window("month", datetime.fromtimestamp(now, UTC))
        window = (int(start.timestamp()), int(end.timestamp()))
    cache_key = (key.key_id, window[0])
    summaries = runtime.usage_cache.get(cache_key)
    if summaries is None:
        summarize = db_call(usage_summary)
        total = await summarize(key.key_id)
        period = await summarize(key.key_id, datetime.fromtimestamp(window[0], UTC))
        runtime.readiness.up("database")  # a failure is mapped to 503 (and reported) by the app
        summaries = runtime.usage_cache[cache_key] = (_jsonable(total), _jsonable(period))
    remaining = await runtime.limiter.peek(key.scopes(now), now=now)
    body = {
        "object": "usage",
        "key": {"prefix": key.prefix, "tenant": key.tenant_slug},
        "total": summaries[0],
        "period": {"start": _iso(window[0]), "end": _iso(window[1]), **summaries[1]},
        "limits": remaining,
    }
    await send_json(send, 200, orjson.dumps(body), ex.rid, decision.headers)
