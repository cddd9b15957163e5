"""Writing usage events into the database, and telling an outage from a bad event.

Both drainers (the journal's and the Redis stream's) hand batches to a :data:`Writer`
(by default :func:`django_writer`: ``usage_records_write``, idempotent on
``request_id``) through :func:`write_batch`, which gives one answer for both:

- the whole batch written: every index is ``done``;
- an outage (the database is unreachable, :func:`is_transient`): ``outage`` is set and
  only what was written before it is ``done``; the caller keeps the rest for a retry;
- a batch refused for its data: each event is written alone, the ones the database
  still refuses are ``bad`` (the caller sets them aside, with ``reason`` logged).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Writer = Callable[[Sequence[dict[str, Any]]], object]


class UsageWriteFailed(Exception):
    """The database is unavailable: what was not written stays where it was (journal or stream)."""


def transient_errors() -> tuple[type[BaseException], ...]:
    """Writer errors that mean "the database is unavailable", not "this event is bad".

    Connection-level errors and Django's database errors, except DataError and
    IntegrityError (which a particular event causes). A deploy whose schema does not
    match (ProgrammingError) thus holds the records back rather than setting them aside.
    """
    from django.db import DatabaseError

    return (OSError, DatabaseError)  # OSError: ConnectionError and TimeoutError included


def is_transient(error: BaseException) -> bool:
    """An outage (retry later), not an event the database refuses for its data (set it aside)."""
    from django.db import DataError, IntegrityError

    return isinstance(error, transient_errors()) and not isinstance(error, DataError | IntegrityError)


def django_writer(events: Sequence[dict[str, Any]]) -> object:
    """``usage_records_write`` for a long-lived worker thread: drops broken DB connections first.

    Outside the request cycle nothing closes a connection that an outage broke, and
    Django would keep failing on it after the database came back.
    """
    from gateway.conf.db import drop_broken_connections
    from tenancy.services.usage import usage_records_write

    drop_broken_connections()
    return usage_records_write(events)


@dataclass
class BatchResult:
    """What :func:`write_batch` did with each event (indices into the batch)."""

    done: list[int] = field(default_factory=list)
    bad: list[int] = field(default_factory=list)
    outage: BaseException | None = None
    reason: str = ""  # the first refusal, for the log


def write_batch(writer: Writer, events: Sequence[dict[str, Any]]) -> BatchResult:
    """Write ``events`` (blocking); see the module docstring for the three outcomes."""
    result = BatchResult()
    try:
        writer(events)
    except Exception as exc:
        if is_transient(exc):
            result.outage = exc
            return result
    else:
        result.done = list(range(len(events)))
        return result
    for index, event in enumerate(events):
        try:
            writer([event])
        except Exception as exc:
            if is_transient(exc):
                result.outage = exc
                return result
            result.bad.append(index)
            result.reason = result.reason or f"{type(exc).__name__}: {exc}"[:300]
            continue
        result.done.append(index)
    return result
