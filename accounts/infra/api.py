"""The management API's shared DRF pieces, for both sides' endpoints (tenancy.api, accounts.api).

- :class:`ApiViewMixin`: every API view uses it. It gives each request an id (the client's
  ``X-Request-Id`` when it is sane, else a new one; echoed in the response) and makes the
  authenticated user the audit actor (accounts.infra.audit) while the view runs.
- :class:`IsOperator`: platform operators only (active ``is_staff`` users).
- :class:`IdCursorPagination`: newest first, cursor pagination, ``?limit=`` (1 to 500); a
  damaged ``?cursor=`` is a 400. A NUL character anywhere in the query string is a 400 too.
- :func:`api_exception_handler`: DRF's, plus a service's ValidationError as a 400 with a
  message per field (``{"field": ["..."]}``) or ``{"detail": "..."}``, and Django's
  PermissionDenied/Http404 as 403/404, so bad input never becomes a 500.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions
from rest_framework.pagination import CursorPagination
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView, exception_handler

from accounts.infra.audit import Actor, reset_actor, set_actor

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id_of(request: Any) -> str:
    """The request's id: a sane client-sent ``X-Request-Id``, else a new one."""
    given = request.META.get("HTTP_X_REQUEST_ID", "")
    return given if _REQUEST_ID.fullmatch(given) else f"req_{uuid.uuid4().hex}"


def actor_of(request: Request, *, source: str = "api") -> Actor:
    """The audit actor of an authenticated API (or console) request."""
    user = request.user
    token = request.auth
    return Actor(
        source=source,
        label=user.get_username() if user and user.is_authenticated else "anonymous",
        user_id=user.pk if user and user.is_authenticated else None,
        token_prefix=getattr(token, "prefix", "") if token is not None else "",
        ip=request.META.get("REMOTE_ADDR") or None,
        request_id=request_id_of(request),
    )


def query_check(request: Request) -> None:
    """Refuse (400) a query string with a NUL character in any name or value: PostgreSQL can
    neither store nor compare one, so it would otherwise fail deep in a query (a 500)."""
    bad = sorted({name for name, value in request.query_params.lists() if "\x00" in name + "".join(value)})
    if bad:
        raise exceptions.ValidationError(
            {name.replace("\x00", "?"): ["must not contain the NUL character."] for name in bad}
        )


class ApiViewMixin:
    """Audit actor and request id for every management API view (put it first in the bases)."""

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # type: ignore[misc]  # authenticates
        actor = actor_of(request)
        request._audit_token = set_actor(actor)  # type: ignore[attr-defined]
        request._request_id = actor.request_id  # type: ignore[attr-defined]
        query_check(request)

    def finalize_response(self, request: Request, response: Response, *args: Any, **kwargs: Any) -> Response:
        token = getattr(request, "_audit_token", None)
        if token is not None:
            reset_actor(token)
            request._audit_token = None  # type: ignore[attr-defined]
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        response["X-Request-Id"] = getattr(request, "_request_id", None) or request_id_of(request)
        return response


class IsOperator(BasePermission):
    """Platform operators only (active staff users)."""

    message = "Only platform operators may do this."

    def has_permission(self, request: Request, view: APIView) -> bool:
        user = request.user
        return bool(user and user.is_authenticated and user.is_active and user.is_staff)


class IdCursorPagination(CursorPagination):
    """Newest first by id; ``?cursor=`` from the previous page's ``next``, ``?limit=`` 1-500."""

    ordering = "-id"
    page_size = 50
    page_size_query_param = "limit"
    max_page_size = 500

    def decode_cursor(self, request: Request) -> Any:
        """DRF's, but a damaged cursor is a 400 (DRF: 404), and its position must be an id
        (DRF passes any text on to the query: a 500 there)."""
        try:
            cursor = super().decode_cursor(request)
        except exceptions.NotFound:
            cursor = None
            damaged = True
        else:
            position = str(cursor.position) if cursor is not None and cursor.position is not None else None
            damaged = position is not None and not (position.isascii() and position.isdigit() and len(position) <= 18)
        if damaged:
            raise exceptions.ValidationError({"cursor": ["not a page of this list (a damaged link?)."]})
        return cursor


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, plus a service's ValidationError (400, per field when it has fields)."""
    if isinstance(exc, DjangoValidationError):
        if hasattr(exc, "error_dict"):
            exc = exceptions.ValidationError(exc.message_dict)
        else:
            exc = exceptions.ValidationError({"detail": " ".join(exc.messages)})
    return exception_handler(exc, context)
