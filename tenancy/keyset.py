"""Keyset pagination on ``(sort column, id)``, both ways, for logs of millions of rows.

A log offers a few orders (:class:`SortKey`), each read ascending or descending (:class:`Order`).
A page is the ``size`` rows after (or before) a position ``(value, id)`` in that order, read with
``WHERE column <= value AND (column < value OR (column = value AND id < pk)) ORDER BY column
DESC, id DESC LIMIT size + 1``: one index range read when an index has the query's equality
columns followed by ``(column, id)`` -- never an OFFSET, never a COUNT. (The redundant
``column <= value`` is what lets the database start the index scan at the cursor instead of
filtering from the first row.)

Columns that may be null (an unknown cost): rows without a value come after every known value,
in both directions (descending: highest id first, ascending: lowest first). They are a second
segment, ``column IS NULL ORDER BY id``, which the same index serves; a page that crosses from
known to unknown values costs one more query.

Scopes: a page may be read from several querysets (one per tenant of a member, each with its
own ``(tenant, column, id)`` index range) and merged in Python: k scopes cost k queries of at
most ``size + 1`` rows each. Merging compares the values in Python, so only orders on times and
numbers are merged (text orders depend on the database's collation: read them from one scope).

A cursor is text: ``<order>,<value>,<id>`` (e.g. ``-latency,1234.5,987``; the value is empty for
a null value or an order by id alone). It names the order it was made for, so a link made under
another order is refused (:func:`cursor_parse` raises ValueError) rather than read as if it
belonged to this one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Generic, Literal, TypeVar

from django.db.models import ExpressionWrapper, F, Model, Q, QuerySet, Value

from tenancy.params import MAX_ID, id_parse, moment_parse, nul_free

_M = TypeVar("_M", bound=Model)

Kind = Literal["time", "float", "decimal", "int", "text", "id"]

DAMAGED = "not a page of this log (a damaged link?): start again from the first page."
_DECIMAL = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?")
_INT = re.compile(r"-?[0-9]{1,19}")
_TEXT_MAX = 200


@dataclass(frozen=True)
class SortKey:
    """An order a log offers: ``name`` in ``?sort=``, the model ``field`` (``"pk"``: the id
    alone), the ``kind`` of its values (how a cursor's value is read back), whether the
    column may be null, and whether an index in (column, id) order serves it (else a page
    sorts a bounded date range: tenancy.selectors.usage_order_indexed)."""

    name: str
    field: str
    kind: Kind
    nullable: bool = False
    indexed: bool = True


@dataclass(frozen=True)
class Order:
    """A :class:`SortKey` read ascending or descending."""

    key: SortKey
    descending: bool

    @property
    def name(self) -> str:
        """As in ``?sort=``: the key's name, with a leading ``-`` when descending."""
        return ("-" if self.descending else "") + self.key.name


@dataclass(frozen=True)
class Position:
    """Where a row stands in an order: its value (None: null, or an order by id alone) and id."""

    value: Any
    pk: int


@dataclass(frozen=True)
class KeysetPage(Generic[_M]):
    """A page of rows in order; ``next``: the position the following page starts after (None:
    this is the last page); ``previous``: the position the page before ends before (None: this
    is the first page)."""

    rows: list[_M]
    next: Position | None
    previous: Position | None


def order_parse(text: str, keys: Mapping[str, SortKey]) -> Order:
    """The order named ``text`` (``name`` or ``-name``); ValueError for any other text."""
    key = keys.get(text.removeprefix("-"))
    if key is None:
        raise ValueError("one of " + ", ".join(f"{name}, -{name}" for name in keys) + ".")
    return Order(key, text.startswith("-"))


def cursor_text(order: Order, position: Position) -> str:
    """The cursor of ``position`` in ``order`` (read back by :func:`cursor_parse`)."""
    value = position.value
    if value is None or order.key.kind == "id":
        shown = ""
    elif isinstance(value, datetime):
        shown = value.isoformat()
    elif isinstance(value, float):
        shown = repr(value)  # exact: read back to the same float
    elif isinstance(value, Decimal):
        shown = format(value, "f")  # never an exponent (0E-9)
    else:
        shown = str(value)
    return f"{order.name},{shown},{position.pk}"


def cursor_parse(text: str, order: Order) -> Position:
    """The position a cursor made by :func:`cursor_text` for ``order`` names.

    ValueError (its message meant for the person who followed the link) when the text is
    damaged, its value is not one of the order's column (a date for a time, a number in range
    for a number...) or it was made for another order.
    """
    name, comma, rest = nul_free(text).partition(",")
    value_text, comma2, pk_text = rest.rpartition(",")
    if not (comma and comma2):
        raise ValueError(DAMAGED)
    if name != order.name:
        raise ValueError("a page of this log in another order: start again from the first page.")
    try:
        return Position(_value_parse(order.key, value_text), id_parse(pk_text))
    except ValueError:
        raise ValueError(DAMAGED) from None


def _value_parse(key: SortKey, text: str) -> Any:
    """The value of ``key``'s column written as ``text`` in a cursor (ValueError otherwise)."""
    if key.kind == "id" or (key.nullable and text == ""):
        if text:
            raise ValueError(DAMAGED)
        return None
    if key.kind == "time":
        return moment_parse(text, date_ok=False)
    if key.kind == "float":
        number = float(text) if len(text) <= 40 and text.isascii() else math.nan
        if not math.isfinite(number):
            raise ValueError(DAMAGED)
        return number
    if key.kind == "decimal":
        if not _DECIMAL.fullmatch(text):
            raise ValueError(DAMAGED)
        try:
            return Decimal(text)
        except InvalidOperation:  # pragma: no cover - the pattern admits only plain decimals
            raise ValueError(DAMAGED) from None
    if key.kind == "int":
        if not (_INT.fullmatch(text) and abs(int(text)) <= MAX_ID):
            raise ValueError(DAMAGED)
        return int(text)
    if len(text) > _TEXT_MAX:
        raise ValueError(DAMAGED)
    return text


def position_of(order: Order, row: Model) -> Position:
    """Where ``row`` stands in ``order``."""
    value = None if order.key.kind == "id" else getattr(row, order.key.field)
    return Position(value, row.pk)


def keyset_page(
    scopes: Sequence[QuerySet[_M]],
    order: Order,
    *,
    after: Position | None = None,
    before: Position | None = None,
    size: int,
    indexed: bool = True,
) -> KeysetPage[_M]:
    """The ``size`` rows of ``scopes`` (their union) right after ``after`` in ``order`` (neither
    given: the first page) or right before ``before``.

    Going back reaches the first page when fewer than ``size`` rows precede ``before``: that
    page is then the first page, in full. Each scope is read with one query per segment of the
    order it crosses (one, or two for a nullable column), ``LIMIT size + 1``.

    ``indexed=False``: no index has the scopes' filters followed by ``(column, id)``. The rows
    are then ordered by ``column + 0, id + 0``, which no index provides, so the database reads
    the matching rows through the filters' own indexes and sorts them: the cost is the number
    of matching rows, which the caller bounds (a date range). Ordered by the bare columns, the
    planner may instead walk the ``(column, id)`` index filtering every row, a walk bounded by
    nothing when few rows match far from the index's end.
    """
    if len(scopes) > 1 and order.key.kind == "text":
        raise ValueError("text orders are read from one scope (merging would depend on the collation)")
    if before is not None:
        rows = _read(scopes, order, before, backward=True, limit=size + 1, indexed=indexed)
        if len(rows) > size:
            page = rows[:size][::-1]
            return KeysetPage(page, position_of(order, page[-1]), position_of(order, page[0]))
        after = None  # fewer than a page before it: the first page
    rows = _read(scopes, order, after, backward=False, limit=size + 1, indexed=indexed)
    page = rows[:size]
    following = position_of(order, page[-1]) if len(rows) > size else None
    preceding = None if after is None else position_of(order, page[0]) if page else after
    return KeysetPage(page, following, preceding)


def sorted_rows(rows: Sequence[_M], order: Order) -> list[_M]:
    """``rows`` in ``order`` (null values last, as in a page), sorted in Python."""
    field, kind = order.key.field, order.key.kind
    if kind == "id":
        return sorted(rows, key=lambda row: row.pk, reverse=order.descending)
    known = sorted(
        (row for row in rows if getattr(row, field) is not None),
        key=lambda row: (getattr(row, field), row.pk),
        reverse=order.descending,
    )
    unknown = sorted((row for row in rows if getattr(row, field) is None), key=lambda r: r.pk, reverse=order.descending)
    return known + unknown


def _read(
    scopes: Sequence[QuerySet[_M]],
    order: Order,
    start: Position | None,
    *,
    backward: bool,
    limit: int,
    indexed: bool = True,
) -> list[_M]:
    """Up to ``limit`` rows strictly after ``start`` in ``order`` (None: from the first row), or,
    when ``backward``, strictly before it, nearest first."""
    key = order.key
    descending = order.descending != backward
    segments = ["known", "null"] if key.nullable else ["all"]
    if backward:
        segments.reverse()
    first = 0
    if start is not None and key.nullable:
        first = segments.index("null" if start.value is None else "known")
    out: list[_M] = []
    for n, segment in enumerate(segments[first:]):
        bound = start if n == 0 else None
        need = limit - len(out)
        rows: list[_M] = []
        for scope in scopes:
            rows += list(_segment(scope, key, segment, bound, descending, indexed)[:need])
        if len(scopes) > 1:
            if segment == "null" or key.kind == "id":
                rows.sort(key=lambda row: row.pk, reverse=descending)
            else:
                rows.sort(key=lambda row: (getattr(row, key.field), row.pk), reverse=descending)
        out += rows[:need]
        if len(out) >= limit:
            break
    return out


def _segment(
    rows: QuerySet[_M], key: SortKey, segment: str, bound: Position | None, descending: bool, indexed: bool
) -> QuerySet[_M]:
    """``rows`` of one segment of ``key``'s order past ``bound``, ordered (not yet sliced)."""
    strict = "lt" if descending else "gt"
    if key.kind == "id" or segment == "null":
        if segment == "null":
            rows = rows.filter(**{f"{key.field}__isnull": True})
        if bound is not None:
            rows = rows.filter(**{f"pk__{strict}": bound.pk})
        return rows.order_by(_by(rows, "pk", descending, indexed))
    field = key.field
    if key.nullable:
        rows = rows.filter(**{f"{field}__isnull": False})
    if bound is not None:
        rows = rows.filter(**{f"{field}__{strict}e": bound.value})
        rows = rows.filter(
            Q(**{f"{field}__{strict}": bound.value}) | Q(**{field: bound.value, f"pk__{strict}": bound.pk})
        )
    return rows.order_by(_by(rows, field, descending, indexed), _by(rows, "pk", descending, indexed))


def _by(rows: QuerySet[Any], field: str, descending: bool, indexed: bool) -> Any:
    """An ORDER BY term: the column (``indexed``) or ``column + 0``, which no index provides."""
    if indexed:
        return ("-" if descending else "") + field
    meta = rows.model._meta
    model_field = meta.pk if field == "pk" else meta.get_field(field)
    term = ExpressionWrapper(F(field) + Value(0), output_field=model_field)
    return term.desc() if descending else term.asc()
