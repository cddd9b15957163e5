"""Reporting time zones: IANA names checked against zoneinfo (no other dependency, so the
models can validate with it)."""

from __future__ import annotations

import zoneinfo
from functools import lru_cache


def time_zone_validate(name: str) -> str:
    """``name`` if it is an IANA time zone zoneinfo knows (e.g. "Europe/Paris"), else ValueError."""
    text = str(name).strip()
    if not text or text not in _available_zones():
        raise ValueError(f"{name!r} is not an IANA time zone name such as UTC or Europe/Paris.")
    return text


@lru_cache(maxsize=1)
def _available_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) | {"UTC"}


@lru_cache(maxsize=512)
def zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)
