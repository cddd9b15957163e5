"""The one encoding of a usage event, shared by the journal, the Redis stream and the spool.

An event is a dict of ``tenancy.models.UsageRecord`` fields. It travels as one JSON
object: datetimes as ISO 8601 strings, Decimals as strings; :func:`decode_event` gives
them back as strings (``usage_records_write`` parses them).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson


def encode_event(event: dict[str, Any]) -> bytes:
    """JSON of one usage event (no trailing newline)."""
    return orjson.dumps(event, default=_default)


def _default(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):  # orjson handles datetimes itself; subclasses land here
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__} in a usage event")


def decode_event(data: bytes) -> dict[str, Any]:
    """The inverse of :func:`encode_event`; raises ValueError for anything but a JSON object."""
    event = orjson.loads(data)
    if not isinstance(event, dict):
        raise ValueError("a usage event must be a JSON object")
    return event
