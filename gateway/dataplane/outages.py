"""Dependency outages as the data plane's clients see them.

Which exceptions mean "Redis is unavailable" or "the database is unavailable" (as opposed
to a bug), and the answer a request gets while one is: ``503`` in the OpenAI envelope, code
``service_unavailable``, with ``Retry-After`` (the SDKs retry it). The app maps them at its
error boundary (gateway/dataplane/app.py), reports the dependency to readiness (logged once
per outage, gateway/dataplane/readiness.py) and never logs a traceback per request.
"""

from __future__ import annotations

import redis.exceptions

from gateway.contract.errors import SERVER, GatewayError

# Connection refused or lost, no free connection in the pool, a command timed out, Redis
# still loading its data (BusyLoadingError is a ConnectionError). redis-py raises its own
# classes for all of these.
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

RETRY_AFTER_SECONDS = 2


def database_errors() -> tuple[type[BaseException], ...]:
    """Errors of a database that is down or unreachable (not of a bad query)."""
    from django.db import InterfaceError, OperationalError

    return (OperationalError, InterfaceError)


def reason(error: BaseException) -> str:
    """One line for readiness and the log: the error's class only (its text may name hosts)."""
    return type(error).__name__


def unavailable(dependency: str) -> GatewayError:
    """The answer while ``dependency`` (``"redis"``, ``"database"``) is unavailable."""
    what = "Redis" if dependency == "redis" else dependency
    return GatewayError(
        503,
        f"The gateway cannot serve this request while its {what} is unavailable; retry shortly.",
        type=SERVER,
        code="service_unavailable",
        headers=[(b"retry-after", b"%d" % RETRY_AFTER_SECONDS)],
    )
