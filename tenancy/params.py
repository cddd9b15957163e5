"""Query-string values shared by the console's filters and the management API: dates and ids,
read strictly so that bad input is a message, never a 500 (the logs' keyset cursors:
tenancy.keyset).

Every reader raises ValueError with a message meant for the person who typed the value; the
console shows it next to its field, the API answers 400 with it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from django.utils.dateparse import parse_datetime

# Dates outside these years are refused: further out, converting to UTC can overflow (SQLite).
FIRST_YEAR, LAST_YEAR = 1970, 9000
# A database id: a positive bigint.
MAX_ID = 2**63 - 1
NUL = "\x00"


def nul_free(text: str) -> str:
    """``text``, unless it holds a NUL character (PostgreSQL cannot store nor compare one)."""
    if NUL in text:
        raise ValueError("must not contain the NUL character.")
    return text


def moment_parse(text: str, *, date_ok: bool = True) -> datetime:
    """An aware datetime from an ISO 8601 datetime (no offset: UTC) or, if ``date_ok``, a date
    (``YYYY-MM-DD``: UTC midnight)."""
    nul_free(text)
    try:
        moment = parse_datetime(text) or (parse_datetime(text + "T00:00:00") if date_ok else None)
    except ValueError:  # well formed, out of range (month 13, day 32...)
        raise ValueError("not a real date and time.") from None
    if moment is None:
        raise ValueError("an ISO 8601 date (2026-12-01) or date and time (2026-12-01T00:00:00Z).")
    if not FIRST_YEAR <= moment.year <= LAST_YEAR:
        raise ValueError(f"a date between the years {FIRST_YEAR} and {LAST_YEAR}.")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def id_parse(text: str) -> int:
    """A database id: ASCII digits, 1 to 2**63 - 1."""
    nul_free(text)
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= MAX_ID:
        raise ValueError("a whole number from 1 to 9223372036854775807.")
    return int(text)
