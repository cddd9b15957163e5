"""Money and time arithmetic of budgets: cost of a usage, budget windows, reservations.

Pure functions (no database, no settings), so the data plane can call them on the hot
path with the price rows of its snapshot, and the services can call them off it.

Prices are in USD per million tokens (``Decimal``); costs are ``Decimal`` USD rounded
to :data:`COST_PLACES` (nano-dollars), which is what ``UsageRecord.cost`` stores.

**The token convention** (the Responses ``usage`` object, as :func:`usage_fields`
maps it; the usage record keeps it as is):

- ``input_tokens`` counts *every* prompt token, **including** ``cached_tokens`` (prompt
  tokens read from the cache) and ``cache_write_tokens`` (prompt tokens written to the
  cache, reported in ``input_tokens_details`` by upstreams with paid cache writes);
- ``output_tokens`` counts every generated token, **including** ``reasoning_tokens``;
- ``total_tokens`` = ``input_tokens + output_tokens``.

So no token is ever billed twice: each detail is carved out of its total (see :func:`cost_usd`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from tenancy.models import PriceVersion

# Cost precision: 9 decimal places (a nano-dollar). One token at $0.01 per million
# costs 1e-8 USD, so coarser rounding would lose cheap requests entirely.
COST_PLACES = 9
_COST_QUANTUM = Decimal(1).scaleb(-COST_PLACES)
_MILLION = Decimal(1_000_000)

BUDGET_PERIODS = ("day", "week", "month", "fixed")


# The token fields of a usage record, in the order every writer and reader uses.
TOKEN_FIELDS = (
    "input_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
)


def unknown_usage() -> dict[str, int | None]:
    """Token fields of a usage nobody reported: every count None."""
    return dict.fromkeys(TOKEN_FIELDS)


def _count(value: object) -> int | None:
    # bool is an int subclass; a token count is never a bool.
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def usage_fields(usage: object) -> dict[str, int | None]:
    """Map a Responses ``usage`` object to usage-record fields; unreported values stay None."""
    if not isinstance(usage, dict):
        return unknown_usage()
    inp = usage.get("input_tokens_details")
    out = usage.get("output_tokens_details")
    inp = inp if isinstance(inp, dict) else {}
    out = out if isinstance(out, dict) else {}
    return {
        "input_tokens": _count(usage.get("input_tokens")),
        "cached_tokens": _count(inp.get("cached_tokens")),
        "cache_write_tokens": _count(inp.get("cache_write_tokens")),
        "output_tokens": _count(usage.get("output_tokens")),
        "reasoning_tokens": _count(out.get("reasoning_tokens")),
        "total_tokens": _count(usage.get("total_tokens")),
    }


@dataclass(frozen=True, slots=True)
class Price:
    """An immutable price version, as the data plane keeps it in its snapshot."""

    id: int
    model: str
    input: Decimal
    cached_input: Decimal
    cache_write: Decimal
    output: Decimal
    reasoning: Decimal | None
    effective_from: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Price:
        """Build from a ``tenancy.selectors.prices_for_snapshot`` row."""
        reasoning = row.get("reasoning")
        return cls(
            id=int(row["id"]),
            model=str(row["model"]),
            input=Decimal(row["input"]),
            cached_input=Decimal(row["cached_input"]),
            cache_write=Decimal(row["cache_write"]),
            output=Decimal(row["output"]),
            reasoning=Decimal(reasoning) if reasoning is not None else None,
            effective_from=row["effective_from"],
        )


# One price version of a model: the stored row, or the snapshot's immutable copy. USD per
# million tokens; ``reasoning`` None: reasoning tokens cost the output price.
PriceRow: TypeAlias = "Price | PriceVersion"


def _tokens(usage: Mapping[str, int | None], name: str) -> int | None:
    value = usage.get(name)
    # bool is an int subclass; a token count is never a bool, nor negative.
    if value is None or isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def cost_usd(usage: Mapping[str, int | None], price: PriceRow) -> Decimal | None:
    """The USD cost of one request's ``usage`` under ``price``, or None when unknown.

    Contract (token convention in the module docstring; ``P.x`` is USD per 1M tokens)::

        cached      = min(cached_tokens or 0, input_tokens)
        cache_write = min(cache_write_tokens or 0, input_tokens - cached)
        uncached    = input_tokens - cached - cache_write
        reasoning   = min(reasoning_tokens or 0, output_tokens)
        visible     = output_tokens - reasoning
        cost = ( uncached    * P.input
               + cached      * P.cached_input
               + cache_write * P.cache_write
               + visible     * P.output
               + reasoning   * (P.reasoning if P.reasoning is not None else P.output)
               ) / 1_000_000

    rounded half-up to 9 decimal places. Exactly ``input_tokens + output_tokens`` tokens
    are billed: the details only move tokens to another rate, never add any (an
    inconsistent detail larger than its total is clamped to it).

    Unknown: ``input_tokens`` or ``output_tokens`` missing/None -> None (unknown tokens
    are an unknown cost, not zero). A missing *detail* (cached, cache write, reasoning)
    counts as 0, i.e. those tokens are billed at the base input/output rate.
    """
    billed = billed_tokens(usage)
    if billed is None:
        return None
    uncached, cached, cache_write, visible, reasoning = billed
    reasoning_price = price.reasoning if price.reasoning is not None else price.output
    micro = (
        uncached * price.input
        + cached * price.cached_input
        + cache_write * price.cache_write
        + visible * price.output
        + reasoning * reasoning_price
    )
    return (micro / _MILLION).quantize(_COST_QUANTUM, rounding=ROUND_HALF_UP)


# The token kinds a usage is billed in, each at its own rate (see billed_tokens).
BILLED_KINDS = ("input", "cached_input", "cache_write", "output", "reasoning")


def billed_tokens(usage: Mapping[str, int | None]) -> tuple[int, int, int, int, int] | None:
    """The tokens of ``usage`` per billed kind, as :func:`cost_usd` carves them, or None when unknown.

    ``(uncached input, cached input, cache write, visible output, reasoning)``: they add up to
    ``input_tokens + output_tokens`` exactly (a detail larger than its total is clamped to it).
    """
    return carve(
        _tokens(usage, "input_tokens"),
        _tokens(usage, "cached_tokens"),
        _tokens(usage, "cache_write_tokens"),
        _tokens(usage, "output_tokens"),
        _tokens(usage, "reasoning_tokens"),
    )


def carve(
    input_tokens: int | None,
    cached_tokens: int | None,
    cache_write_tokens: int | None,
    output_tokens: int | None,
    reasoning_tokens: int | None,
) -> tuple[int, int, int, int, int] | None:
    """:func:`billed_tokens` of counts already known to be None or >= 0 (usage records' columns)."""
    if input_tokens is None or output_tokens is None:
        return None
    cached = min(cached_tokens or 0, input_tokens)
    cache_write = min(cache_write_tokens or 0, input_tokens - cached)
    reasoning = min(reasoning_tokens or 0, output_tokens)
    return input_tokens - cached - cache_write, cached, cache_write, output_tokens - reasoning, reasoning


def rates_micro(price: PriceRow) -> tuple[int, int, int, int, int]:
    """The price's rates per :data:`BILLED_KINDS` in micro-USD per million tokens (exact integers:
    prices have 6 decimals), i.e. pico-USD per token."""
    reasoning = price.reasoning if price.reasoning is not None else price.output
    rates = (price.input, price.cached_input, price.cache_write, price.output, reasoning)
    return tuple(int((Decimal(rate) * _MILLION).to_integral_value()) for rate in rates)  # type: ignore[return-value]


def cost_pusd(billed: tuple[int, int, int, int, int], rates: tuple[int, int, int, int, int]) -> int:
    """The exact cost of ``billed`` tokens (:func:`billed_tokens`) in pico-USD (1e-12 USD), unrounded:
    :func:`cost_usd` is this rounded half-up to nano-dollars."""
    return sum(tokens * rate for tokens, rate in zip(billed, rates, strict=True))


def pusd_to_usd(pusd: int) -> Decimal:
    """Pico-USD back to USD (exact)."""
    return Decimal(pusd).scaleb(-12)


def usd_to_micros(amount: Decimal) -> int:
    """USD as integer micro-USD (what budget counters hold), rounded UP: spend is never undercounted."""
    return int((amount * _MILLION).to_integral_value(rounding=ROUND_CEILING))


def micros_to_usd(micros: int) -> Decimal:
    """Integer micro-USD back to USD (exact)."""
    return Decimal(micros).scaleb(-6)


def estimate_tokens(request_body_bytes_len: int, max_output_tokens: int | None, default_output: int) -> int:
    """A cheap upper-ish estimate of the tokens a request will use, for reservations.

    Input: ``bytes // 4 + 1`` (about 4 bytes per token for English JSON; the request body
    also holds JSON syntax, so this tends to overestimate, which is the safe side).
    Output: ``max_output_tokens`` when given (the caller passes the request's value already
    clamped to the key's cap), else ``default_output``. Never below 1.
    """
    input_estimate = max(request_body_bytes_len, 0) // 4 + 1
    output_estimate = max_output_tokens if max_output_tokens is not None else default_output
    return input_estimate + max(output_estimate, 0)


def estimate_cost_usd(input_tokens: int, output_tokens: int, price: PriceRow) -> Decimal:
    """An upper bound of the cost of a request, for money reservations.

    Every input token at the full input price (no cache discount; a cache write may cost
    more, so the larger of the two), every output token at the larger of the output and
    reasoning prices. Settling replaces it with :func:`cost_usd` of the real usage.
    """
    input_price = max(price.input, price.cache_write)
    output_price = max(price.output, price.reasoning if price.reasoning is not None else price.output)
    micro = max(input_tokens, 0) * input_price + max(output_tokens, 0) * output_price
    return (micro / _MILLION).quantize(_COST_QUANTUM, rounding=ROUND_HALF_UP)


def budget_window(
    period: str, now: datetime, window_start: datetime | None = None, window_end: datetime | None = None
) -> tuple[datetime, datetime]:
    """The budget period containing ``now``, as ``[start, end)`` aware UTC datetimes.

    - ``day``: from 00:00 UTC today to 00:00 UTC tomorrow;
    - ``week``: ISO week, from Monday 00:00 UTC to the next Monday 00:00 UTC;
    - ``month``: from the 1st 00:00 UTC to the 1st of the next month 00:00 UTC;
    - ``fixed``: ``(window_start, window_end)`` as given (converted to UTC). ``now`` may
      lie outside it: the budget covers only spend inside the window, so the caller
      applies it only when ``start <= now < end`` (see :func:`in_window`).

    Raises ValueError for a naive ``now``, an unknown period, or a fixed period without
    both (aware) ends or with ``end <= start``.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(UTC)
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    if period == "week":
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        start = day - timedelta(days=day.weekday())  # Monday is 0
        return start, start + timedelta(days=7)
    if period == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start, end
    if period == "fixed":
        if window_start is None or window_end is None:
            raise ValueError("a fixed budget period needs both window_start and window_end")
        if window_start.tzinfo is None or window_end.tzinfo is None:
            raise ValueError("budget window ends must be timezone-aware")
        if window_end <= window_start:
            raise ValueError("budget window_end must be after window_start")
        return window_start.astimezone(UTC), window_end.astimezone(UTC)
    raise ValueError(f"unknown budget period {period!r}; expected one of {', '.join(BUDGET_PERIODS)}")


def in_window(window: tuple[datetime, datetime], now: datetime) -> bool:
    """Whether ``now`` lies in ``[start, end)``."""
    return window[0] <= now < window[1]


class PriceTable:
    """Every price version, looked up by model and request time (pure; built per snapshot).

    The price applied to a request is the version of its model with the greatest
    ``effective_from <= at``; among versions with the same ``effective_from``, the one
    created last (greatest id) wins, so re-running ``price_set`` corrects a price.
    """

    __slots__ = ("_by_model",)

    def __init__(self, prices: Iterable[Price]) -> None:
        grouped: dict[str, list[Price]] = {}
        for price in prices:
            grouped.setdefault(price.model, []).append(price)
        self._by_model: dict[str, tuple[list[float], list[Price]]] = {}
        for model, rows in grouped.items():
            rows.sort(key=lambda p: (p.effective_from, p.id))
            self._by_model[model] = ([p.effective_from.timestamp() for p in rows], rows)

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> PriceTable:
        """Build from ``tenancy.selectors.prices_for_snapshot()``."""
        return cls(Price.from_row(row) for row in rows)

    def lookup(self, model: str, at: datetime | float) -> Price | None:
        """The price of ``model`` effective at ``at`` (aware datetime or epoch seconds), or None."""
        entry = self._by_model.get(model)
        if entry is None:
            return None
        stamps, rows = entry
        moment = at.timestamp() if isinstance(at, datetime) else at
        index = bisect.bisect_right(stamps, moment)
        return rows[index - 1] if index else None

    def __len__(self) -> int:
        return sum(len(rows) for _, rows in self._by_model.values())

    def versions(self) -> list[Price]:
        """Every price version of the table."""
        return [price for _, rows in self._by_model.values() for price in rows]
