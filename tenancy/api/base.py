"""The base of the demand side's endpoints: authenticated, newest first, scoped to the caller's tenants."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any, TypeVar

from django.db.models import Model, QuerySet
from django.utils.dateparse import parse_datetime
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, viewsets
from rest_framework.exceptions import ValidationError
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.urls import replace_query_param

from accounts.infra.api import ApiViewMixin, IdCursorPagination
from tenancy.access import tenant_ids_for, tenant_or_404
from tenancy.keyset import DAMAGED, KeysetPage, Order, Position, SortKey, cursor_parse, cursor_text, keyset_page
from tenancy.params import FIRST_YEAR, LAST_YEAR, nul_free

_M = TypeVar("_M", bound=Model)

TENANT_FILTER = OpenApiParameter("tenant", str, description="Only this tenant (slug or id).")
TIME_RANGE = [
    OpenApiParameter("from", str, description="From this time on (ISO 8601 with offset), inclusive."),
    OpenApiParameter("to", str, description="Before this time (ISO 8601 with offset), exclusive."),
]


def timed_list(*parameters: OpenApiParameter) -> Any:
    """Describe a list's filters: ``?tenant=``, ``?from=``/``?to=`` and ``parameters``."""
    return extend_schema_view(list=extend_schema(parameters=[TENANT_FILTER, *TIME_RANGE, *parameters]))


def validated(serializer: type[serializers.Serializer[Any]], request: Request) -> dict[str, Any]:
    """The request body checked by ``serializer`` (a 400 with a message per field otherwise)."""
    body = serializer(data=request.data)
    body.is_valid(raise_exception=True)
    return dict(body.validated_data)


def when(params: Any, name: str) -> datetime | None:
    """The aware datetime of query parameter ``name`` (absent: None; anything else: a 400)."""
    text = params.get(name)
    if not text:
        return None
    try:
        value = parse_datetime(nul_free(text))
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise ValidationError({name: "an ISO 8601 date and time with its offset, e.g. 2026-12-01T00:00:00Z."})
    if not FIRST_YEAR <= value.year <= LAST_YEAR:
        raise ValidationError({name: f"a date between the years {FIRST_YEAR} and {LAST_YEAR}."})
    return value


def whole(params: Any, name: str) -> int | None:
    """The whole number of query parameter ``name`` (absent: None; anything else: a 400)."""
    text = params.get(name)
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise ValidationError({name: "a whole number."})
    return int(text)


def in_time_range(rows: QuerySet[_M], params: Any, field: str = "created_at") -> QuerySet[_M]:
    """``rows`` with ``field`` in ``[from, to)`` of the query string."""
    start, end = when(params, "from"), when(params, "to")
    if start is not None:
        rows = rows.filter(**{f"{field}__gte": start})
    if end is not None:
        rows = rows.filter(**{f"{field}__lt": end})
    return rows


class TimeKeysetPagination(IdCursorPagination):
    """Newest first by ``(created_at, id)``, keyset pagination (tenancy.keyset): ``?cursor=``
    from a page's ``next`` or ``previous`` link, ``?limit=`` 1-500 (default 50).

    Every page is one index range read after (or before) the position the cursor names, however
    deep: no OFFSET (DRF's CursorPagination keeps one for rows sharing a time) and no COUNT. The
    cursor is opaque: base64url of ``a:`` (the page after) or ``b:`` (the page before) and the
    keyset cursor of the position. A damaged one, or one made for another list, is a 400.
    The answer has DRF's shape (``next``, ``previous``, ``results``), so its schema is DRF's.
    """

    order = Order(SortKey("time", "created_at", "time"), descending=True)

    def positions(self, request: Request) -> tuple[Position | None, Position | None]:
        """``(after, before)``: the position the asked page follows or precedes (both None: the
        first page). Raises a 400 for a damaged cursor."""
        text = request.query_params.get(self.cursor_query_param)
        if not text:
            return None, None
        try:
            decoded = base64.b64decode(text.encode("ascii"), altchars=b"-_", validate=True).decode("utf-8")
            way, _, cursor = decoded.partition(":")
            if way not in ("a", "b"):
                raise ValueError(DAMAGED)
            position = cursor_parse(cursor, self.order)
        except (ValueError, UnicodeError, binascii.Error):
            raise ValidationError({"cursor": ["not a page of this list (a damaged link?)."]}) from None
        return (position, None) if way == "a" else (None, position)

    def paginate_queryset(self, queryset: Any, request: Request, view: Any = None) -> list[Any]:
        """A page of ``queryset`` (DRF's entry point, for a view that leaves paging to it)."""
        after, before = self.positions(request)
        page = keyset_page([queryset], self.order, after=after, before=before, size=self.size(request))
        self.keep(request, page)
        return page.rows

    def size(self, request: Request) -> int:
        """The page size asked for (``?limit=``, 1-500), else the default."""
        return self.get_page_size(request) or int(self.page_size or 50)

    def keep(self, request: Request, page: KeysetPage[Any]) -> None:
        """Remember ``page``'s links for :meth:`get_paginated_response`."""
        self.request = request
        self.page_url = request.build_absolute_uri()
        self.keyset = page

    def _link(self, way: str, position: Position | None) -> str | None:
        if position is None:
            return None
        cursor = f"{way}:{cursor_text(self.order, position)}".encode()
        return replace_query_param(self.page_url, self.cursor_query_param, base64.urlsafe_b64encode(cursor).decode())

    def get_next_link(self) -> str | None:
        return self._link("a", self.keyset.next)

    def get_previous_link(self) -> str | None:
        return self._link("b", self.keyset.previous)


class ScopedViewSet(ApiViewMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Read: list and retrieve of the rows of the caller's tenants (an outsider's object: 404)."""

    permission_classes = [IsAuthenticated]
    pagination_class = IdCursorPagination

    def scoped(self, rows: QuerySet[_M], tenant_field: str = "tenant") -> QuerySet[_M]:
        """``rows`` of the caller's tenants, and of the ``?tenant=`` one when listing."""
        user = self.request.user
        ids = tenant_ids_for(user)
        if ids is not None:
            rows = rows.filter(**{f"{tenant_field}_id__in": ids})
        tenant = self.request.query_params.get("tenant") if self.action == "list" else None
        if tenant:
            rows = rows.filter(**{f"{tenant_field}_id": tenant_or_404(user, tenant).pk})
        return rows


class ManagedViewSet(ScopedViewSet, mixins.UpdateModelMixin, mixins.DestroyModelMixin):
    """Read and write: PATCH (no PUT) and DELETE besides create, list and retrieve."""

    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    @extend_schema(exclude=True)
    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:  # PUT: not offered
        return self.http_method_not_allowed(request)
