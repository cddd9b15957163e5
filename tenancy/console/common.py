"""What every console page shares: sign-in (and the second factor) required, the audit actor,
operators-only pages (404 for anyone else), confirmation pages, sortable paginated tables and
a service's ValidationError shown next to the form field it names."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlencode

from django import forms
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Page, Paginator
from django.db.models import Model, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.shortcuts import redirect, render
from django_otp import user_has_device

from accounts.infra.api import request_id_of
from accounts.infra.audit import Actor, acting_as
from tenancy.access import is_operator

View = Callable[..., HttpResponse]
_M = TypeVar("_M", bound=Model)

PAGE_SIZE = 25


def console_actor(request: HttpRequest) -> Actor:
    """The audit actor of a signed-in console request."""
    user = request.user
    return Actor(
        source="console",
        label=user.get_username(),
        user_id=user.pk,
        ip=request.META.get("REMOTE_ADDR") or None,
        request_id=request_id_of(request),
    )


def has_confirmed_device(user: Any) -> bool:
    """Whether ``user`` enrolled a TOTP device (tenancy.console.otp) and confirmed it."""
    return bool(getattr(user, "is_authenticated", False) and user_has_device(user, confirmed=True))


def second_factor_pending(request: HttpRequest) -> bool:
    """Signed in with a password, but the user has a confirmed TOTP device and has not given a
    code in this session (e.g. signed in through the admin's form)."""
    user = request.user
    verified = getattr(user, "is_verified", None)
    return bool(has_confirmed_device(user) and not (verified and verified()))


def checks_own_query(view: View) -> View:
    """Mark a page whose filter form reads every query parameter (errors next to its fields):
    :func:`console_view` leaves its query string to it."""
    view.checks_own_query = True  # type: ignore[attr-defined]
    return view


def bad_query(request: HttpRequest) -> HttpResponse | None:
    """A 400 page naming each query parameter with a NUL character (PostgreSQL can neither
    store nor compare one), or None when there is none."""
    bad = sorted({name for name, values in request.GET.lists() if "\x00" in name + "".join(values)})
    if not bad:
        return None
    errors = [(name.replace("\x00", "?"), "must not contain the NUL character.") for name in bad]
    return render(request, "console/bad_query.html", {"errors": errors}, status=400)


def console_view(view: View) -> View:
    """A console page: anonymous visits go to the login page, a pending second factor to its
    prompt; a query string with a NUL character is a 400 (unless the page's own filter form
    reads it: :func:`checks_own_query`); the changes it makes are audited as the signed-in
    user's, from the console."""
    own_query = getattr(view, "checks_own_query", False)

    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect(f"/console/login/?{urlencode({'next': request.get_full_path()})}")
        if second_factor_pending(request):
            return redirect("console:login-otp")
        refused = None if own_query else bad_query(request)
        if refused is not None:
            return refused
        with acting_as(console_actor(request)):
            return view(request, *args, **kwargs)

    return wrapper


def operator_view(view: View) -> View:
    """A console page for platform operators only: 404 for everyone else (as if absent)."""

    @console_view
    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not is_operator(request.user):
            raise Http404("No such page.")
        return view(request, *args, **kwargs)

    return wrapper


def only_post(request: HttpRequest) -> HttpResponse | None:
    """405 unless a POST: called after the lookups, so an outsider gets 404 whatever the method."""
    return None if request.method == "POST" else HttpResponseNotAllowed(["POST"])


def confirm(
    request: HttpRequest,
    *,
    title: str,
    message: str,
    button: str,
    cancel_url: str,
    form: forms.Form | None = None,
    danger: bool = True,
) -> HttpResponse:
    """The confirmation page of a destructive action: it POSTs back to the same URL."""
    return render(
        request,
        "console/confirm.html",
        {
            "title": title,
            "message": message,
            "button": button,
            "cancel_url": cancel_url,
            "form": form,
            "danger": danger,
        },
    )


def service_errors(form: forms.BaseForm, error: ValidationError, field_of: Mapping[str, str] | None = None) -> None:
    """Show a service's ValidationError on ``form``: next to the field it names (through
    ``field_of`` for the service's names that differ from the form's), else above the form."""
    field_of = field_of or {}
    if hasattr(error, "error_dict"):
        for name, errors in error.message_dict.items():
            field = field_of.get(name, name)
            form.add_error(field if field in form.fields else None, errors)
        return
    text = " ".join(error.messages)
    lowered = text.lower()
    for name, field in field_of.items():
        if (name in lowered or name.replace("_", " ") in lowered) and field in form.fields:
            form.add_error(field, text)
            return
    form.add_error(None, text)


def done(request: HttpRequest, text: str, to: str, *args: Any) -> HttpResponse:
    """Say what was done (a message on the next page) and go there (POST/redirect/GET)."""
    messages.success(request, text)
    return redirect(to, *args)


@dataclass(frozen=True)
class Column:
    label: str
    key: str  # "" when the column does not sort
    url: str
    aria_sort: str  # "ascending", "descending" or "" (not the sort column)
    numeric: bool = False


@dataclass(frozen=True)
class Table:
    columns: list[Column]
    page: Page[Any]
    previous_url: str
    next_url: str


def table(
    request: HttpRequest,
    rows: QuerySet[_M],
    columns: Sequence[tuple[str, str, str]],
    *,
    default: str,
    numeric: Sequence[str] = (),
    page_size: int = PAGE_SIZE,
) -> Table:
    """A sortable, paginated table of ``rows``.

    ``columns``: ``(label, sort key, order_by field)``; a column with an empty key does not sort.
    ``?sort=key`` or ``?sort=-key`` picks the order (an unknown key: ``default``), ``?page=`` the page.
    """
    fields = {key: field for _, key, field in columns if key}
    wanted = request.GET.get("sort", default)
    key = wanted.removeprefix("-")
    if key not in fields:
        wanted, key = default, default.removeprefix("-")
    descending = wanted.startswith("-")
    order = ("-" if descending else "") + fields[key]
    rows = rows.order_by(order, "-pk" if descending else "pk")
    page = Paginator(rows, page_size).get_page(request.GET.get("page"))

    def url(**changes: Any) -> str:
        query = request.GET.copy()
        for name, value in changes.items():
            query[name] = value
        return "?" + query.urlencode()

    out: list[Column] = []
    for label, col_key, _ in columns:
        if not col_key:
            out.append(Column(label, "", "", "", col_key in numeric))
            continue
        current = col_key == key
        next_sort = col_key if current and descending else f"-{col_key}" if current else col_key
        aria = ("descending" if descending else "ascending") if current else ""
        out.append(Column(label, col_key, url(sort=next_sort, page=1), aria, col_key in numeric))
    return Table(
        columns=out,
        page=page,
        previous_url=url(page=page.previous_page_number()) if page.has_previous() else "",
        next_url=url(page=page.next_page_number()) if page.has_next() else "",
    )


@dataclass(frozen=True)
class LogColumn:
    """A column of a keyset-paged log: its header, the order it sorts by (``""``: none), whether
    it holds numbers, and whether its first click sorts descending (slowest, costliest first)."""

    label: str
    key: str = ""
    numeric: bool = False
    descending_first: bool = False


def log_header(request: HttpRequest, columns: Sequence[LogColumn], current: str) -> list[Column]:
    """The header cells of a log ordered by ``current`` (``?sort=`` text, e.g. ``-latency``), for
    ``console/_thead.html``: each sortable column links to the first page of its order (the
    current column flips; another starts as its ``descending_first`` says), and the current
    column has ``aria-sort``. The links keep the filters and drop the page cursor."""
    key = current.removeprefix("-")
    descending = current.startswith("-")
    query = request.GET.copy()
    for name in ("after", "before"):
        query.pop(name, None)
    out: list[Column] = []
    for column in columns:
        if not column.key:
            out.append(Column(column.label, "", "", "", column.numeric))
            continue
        if column.key == key:
            flipped = not descending
            aria = "descending" if descending else "ascending"
        else:
            flipped, aria = column.descending_first, ""
        query["sort"] = ("-" if flipped else "") + column.key
        out.append(Column(column.label, column.key, "?" + query.urlencode(), aria, column.numeric))
    return out


def operator_context(request: HttpRequest) -> dict[str, Any]:
    """Template context processor: whether the signed-in user is an operator (for the nav)."""
    return {"console_operator": is_operator(getattr(request, "user", None))}
