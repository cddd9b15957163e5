"""Database connections of threads that have no request cycle (data-plane workers, usage writers)."""

from __future__ import annotations

import time


def drop_broken_connections() -> None:
    """Close this thread's connections that an error left unusable; keep the healthy ones open.

    Nothing else closes a connection that a database restart broke in a worker thread, so
    every later call there would fail. Django's ``close_old_connections`` also closes any
    connection older than ``CONN_MAX_AGE``: 0 for SQLite, which meant a new connection
    (and its ``PRAGMA``) per call and cost the key-mix benchmark a third of its time. Here
    a positive ``CONN_MAX_AGE`` (PostgreSQL: 60 s) is still honoured; 0 means "keep".
    """
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        if connection.connection is None:
            continue
        if connection.errors_occurred:
            if connection.is_usable():
                connection.errors_occurred = False
            else:
                connection.close()
                continue
        max_age = connection.settings_dict.get("CONN_MAX_AGE")
        if max_age and connection.close_at is not None and time.monotonic() >= connection.close_at:
            connection.close()
