"""Database connections of threads that have no request cycle (data-plane workers, usage writers)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async


def drop_broken_connections() -> None:
    """Django's end-of-request connection hygiene, minus "``CONN_MAX_AGE`` 0 means close".

    Nothing else closes a connection that a database restart broke in a worker thread, so
    every later call there would fail; this closes it when it errored or fails its health
    check (``CONN_HEALTH_CHECKS``, checked on next use), as ``close_old_connections``
    does. That function also closes any connection older than ``CONN_MAX_AGE``: 0 for
    SQLite, which meant a new connection (and its ``PRAGMA``) per call and cost the
    key-mix benchmark a third of its time. Here 0 means "keep"; a positive age
    (PostgreSQL: 60 s) is still honoured.
    """
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        if connection.connection is None:
            continue
        if not connection.settings_dict.get("CONN_MAX_AGE"):
            connection.close_at = None
        connection.close_if_unusable_or_obsolete()


def db_call(function: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """``function`` run in a worker thread, after dropping that thread's broken connection.

    Worker threads keep their Django connection; nothing else closes one that a database
    restart broke (there is no request cycle here), so without this every later call in
    that thread would fail.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        drop_broken_connections()
        return function(*args, **kwargs)

    return sync_to_async(call, thread_sensitive=False)
