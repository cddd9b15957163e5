"""The request log (with one request's page), the audit log and usage: read-only pages.

Members read their tenants' requests and usage; the audit log is for operators and the owners
and admins of a tenant (as in the API). The logs are newest first unless a column header
sorts them (``?sort=``), with keyset pagination both ways (``?after=`` / ``?before=`` a cursor
of that order, tenancy.keyset): a page is one index range read, never an OFFSET or a COUNT over
millions of rows. Usage is read from the 15-minute rollups (tenancy/reports.py), never from
the raw records.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django import forms
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from tenancy.access import tenant_ids_for, tenant_or_404, tenants_for
from tenancy.console.common import LogColumn, checks_own_query, console_view, log_header
from tenancy.console.filters import AuditFilter, RequestLogFilter, UsageFilter
from tenancy.keyset import KeysetPage, Order, cursor_text
from tenancy.pricing import TOKEN_FIELDS
from tenancy.reports import REPORT_CSV_COLUMNS, ReportError, ReportQuery, report_rows, usage_report
from tenancy.selectors import (
    UNINDEXED_SORT_CAP,
    RecordFilter,
    TooManyToSort,
    audit_entries_page,
    usage_order_indexed,
    usage_record_get,
    usage_records_page,
    usage_sort_start,
)
from tenancy.services.rollups import data_as_of

LOG_PAGE = 50
# The usage page's ranges: label and length (the end is the next 15-minute boundary).
USAGE_RANGES = {"24h": ("Last 24 hours", timedelta(hours=24)), "7d": ("Last 7 days", timedelta(days=7))}
USAGE_RANGES["30d"] = ("Last 30 days", timedelta(days=30))
GROUPS = ("tenant", "key", "model", "account")


def _bad_filters(request: HttpRequest, template: str, form: forms.Form, context: dict[str, Any]) -> HttpResponse:
    """The page with its filter form's errors next to their fields and no rows: a 400."""
    return render(request, template, {**context, "form": form}, status=400)


def _query_with(request: HttpRequest, **changes: str) -> str:
    query = request.GET.copy()
    for name, value in changes.items():
        query[name] = value
    return "?" + query.urlencode()


# The request log's columns: header, order (tenancy.selectors.USAGE_SORTS), numeric, first
# click descending.
REQUEST_COLUMNS = [
    LogColumn("Time (UTC)", "time", descending_first=True),
    LogColumn("Request id"),
    LogColumn("Tenant"),
    LogColumn("Key"),
    LogColumn("Model"),
    LogColumn("Status", "status", numeric=True, descending_first=True),
    LogColumn("Outcome"),
    LogColumn("Account", numeric=True),
    LogColumn("Tokens", "tokens", numeric=True, descending_first=True),
    LogColumn("Cost (USD)", "cost", numeric=True, descending_first=True),
    LogColumn("Latency (ms)", "latency", numeric=True, descending_first=True),
    LogColumn("First byte (ms)", numeric=True),
    LogColumn("Attempts", numeric=True),
]
AUDIT_COLUMNS = [
    LogColumn("Time (UTC)", "time", descending_first=True),
    LogColumn("Who", "actor"),
    LogColumn("From"),
    LogColumn("Action", "action"),
    LogColumn("What"),
    LogColumn("Before"),
    LogColumn("After"),
]
# What the caption says of each order (ascending, descending).
ORDER_WORDS = {
    "time": ("oldest first", "newest first"),
    "latency": ("by latency, fastest first", "by latency, slowest first"),
    "cost": ("by cost, cheapest first (unknown last)", "by cost, costliest first (unknown last)"),
    "tokens": ("by tokens, fewest first (unknown last)", "by tokens, most first (unknown last)"),
    "status": ("by status, lowest first", "by status, highest first"),
    "actor": ("by who, A to Z", "by who, Z to A"),
    "action": ("by action, A to Z", "by action, Z to A"),
}
# A key, account, model or status filter in an order other than time has no index: the page
# sorts the matching records of a date range (by default the last day; docs/console.md).
SORT_WINDOW = timedelta(days=1)


def _page_links(request: HttpRequest, page: KeysetPage[Any], order: Order) -> dict[str, str]:
    """The first, previous and next page links of a keyset page (empty: none)."""

    def link(**cursor: str) -> str:
        query = request.GET.copy()
        for name in ("after", "before"):
            query.pop(name, None)
        query.update(cursor)
        return "?" + query.urlencode()

    return {
        "first_url": link() if page.previous is not None else "",
        "previous_url": link(before=cursor_text(order, page.previous)) if page.previous is not None else "",
        "next_url": link(after=cursor_text(order, page.next)) if page.next is not None else "",
    }


def _windowed(wanted: RecordFilter, order: Order, tenant_ids: Any) -> tuple[RecordFilter, str]:
    """``wanted`` with a date range when no index serves it in ``order``
    (tenancy.selectors.usage_order_indexed): none given means the last day, or the newest
    ``UNINDEXED_SORT_CAP`` requests of it when it holds more (tenancy.selectors.usage_sort_start).
    Also what the page says of it ("" when an index serves the page)."""
    if usage_order_indexed(wanted, order):
        return wanted, ""
    start = wanted.start
    if start is None:
        start = usage_sort_start(tenant_ids, wanted, (wanted.end or timezone.now()) - SORT_WINDOW)
    shown = f"{start:%Y-%m-%d %H:%M} UTC to " + (f"{wanted.end:%Y-%m-%d %H:%M} UTC" if wanted.end else "now")
    default = "" if wanted.start is not None else f", by default the last day or its newest {UNINDEXED_SORT_CAP:,}"
    note = (
        f"No index sorts requests by {order.key.name}: this page sorts the requests of {shown} "
        f"(From and To choose the range, up to {UNINDEXED_SORT_CAP:,} requests{default})."
    )
    return replace(wanted, start=start), note


@console_view
@checks_own_query
def request_list(request: HttpRequest) -> HttpResponse:
    """The request log: filters, search by request id, sortable (newest first by default),
    keyset pages both ways (tenancy.selectors.usage_records_page)."""
    user = request.user
    get = request.GET
    form = RequestLogFilter(get)
    current = get.get("sort") or "-time"
    context: dict[str, Any] = {
        "section": "requests",
        "tenants": tenants_for(user).order_by("name").only("slug", "name"),
        "filters": {name: get.get(name, "") for name in RECORD_FILTERS},
        "from": get.get("from", ""),
        "to": get.get("to", ""),
        "sort": current if current != "-time" else "",
        "filtered": any(get.get(name) for name in (*RECORD_FILTERS, "from", "to")),
        "records": [],
    }
    if not form.is_valid():
        return _bad_filters(request, "console/requests.html", form, context)
    data = form.cleaned_data
    tenant = tenant_or_404(user, data["tenant"]) if data["tenant"] else None
    order: Order = data["order"]
    wanted = RecordFilter(
        tenant_id=tenant.pk if tenant else None,
        api_key_id=data["key"],
        account_id=data["account"],
        status_code=data["status"],
        model=data["model"].strip(),
        request_id=data["request_id"].strip(),
        start=data["from"],
        end=data["to"],
    )
    wanted, window = _windowed(wanted, order, tenant_ids_for(user))
    try:
        page = usage_records_page(
            tenant_ids_for(user), wanted, order, after=data["after"], before=data["before"], size=LOG_PAGE
        )
    except TooManyToSort as error:
        form.add_error("from", f"{error} in this range to sort them by {order.key.name}: choose a shorter range.")
        return _bad_filters(request, "console/requests.html", form, context)
    context.update(
        form=form,
        records=page.rows,
        window=window,
        caption=ORDER_WORDS[order.key.name][order.descending],
        table={"columns": log_header(request, REQUEST_COLUMNS, order.name)},
        **_page_links(request, page, order),
    )
    return render(request, "console/requests.html", context)


RECORD_FILTERS = ("tenant", "key", "account", "status", "model", "request_id")


@console_view
def request_detail(request: HttpRequest, request_id: str) -> HttpResponse:
    """One request as metered: answer, tokens by kind, cost, timings and every attempt."""
    if "\x00" in request_id:  # no such request (PostgreSQL cannot compare a NUL)
        raise Http404("No such request.")
    record = usage_record_get(tenant_ids_for(request.user), request_id)
    if record is None:
        raise Http404("No such request.")
    tokens = [(name.replace("_", " "), getattr(record, name)) for name in TOKEN_FIELDS]
    context = {"section": "requests", "record": record, "tokens": tokens, "attempts": record.attempts or []}
    return render(request, "console/request.html", context)


@console_view
@checks_own_query
def audit_list(request: HttpRequest) -> HttpResponse:
    """Who changed what, when, with the values before and after: sortable by time, who and
    action, keyset pages both ways (tenancy.selectors.audit_entries_page)."""
    user = request.user
    form = AuditFilter(request.GET)
    current = request.GET.get("sort") or "-time"
    context: dict[str, Any] = {
        "section": "audit",
        "entries": [],
        "tenants": tenants_for(user).order_by("name").only("slug", "name"),
        "tenant": request.GET.get("tenant", ""),
        "action": request.GET.get("action", ""),
        "sort": current if current != "-time" else "",
    }
    if not form.is_valid():
        return _bad_filters(request, "console/audit.html", form, context)
    data = form.cleaned_data
    order: Order = data["order"]
    tenant_id = tenant_or_404(user, data["tenant"]).pk if data["tenant"] else None
    page = audit_entries_page(
        user,
        tenant_id=tenant_id,
        action=data["action"],
        order=order,
        after=data["after"],
        before=data["before"],
        size=LOG_PAGE,
    )
    context.update(
        form=form,
        entries=page.rows,
        caption=ORDER_WORDS[order.key.name][order.descending],
        table={"columns": log_header(request, AUDIT_COLUMNS, order.name)},
        **_page_links(request, page, order),
    )
    return render(request, "console/audit.html", context)


def _usage_query(request: HttpRequest, data: dict[str, Any]) -> tuple[ReportQuery, dict[str, Any]]:
    """The usage page's report query (from the rollups) and what the page shows of it."""
    user = request.user
    range_key = data["range"] or "7d"
    if range_key not in USAGE_RANGES:
        range_key = "7d"
    label, length = USAGE_RANGES[range_key]
    now = timezone.now()
    end = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0) + timedelta(minutes=15)
    group_by = tuple(name for name in GROUPS if name in data["group_by"]) or ("tenant", "model")
    tenant_ids: Any = tenant_ids_for(user)
    if data["tenant"]:
        tenant_ids = [tenant_or_404(user, data["tenant"]).pk]
    elif tenant_ids is not None:
        tenant_ids = list(tenant_ids)
    query = ReportQuery(
        tenant_ids=tenant_ids, start=end - length, end=end, time_zone="UTC", granularity="day", group_by=group_by
    )
    shown = {"range_key": range_key, "range_label": label, "group_by": group_by}
    return query, shown


@console_view
@checks_own_query
def usage(request: HttpRequest) -> HttpResponse:
    """Usage per day over a range, grouped by tenant, key, model or account; CSV export."""
    form = UsageFilter(request.GET)
    if not form.is_valid():
        context = {
            "section": "usage",
            "rows": [],
            "ranges": [(key, value[0]) for key, value in USAGE_RANGES.items()],
            "groups": GROUPS,
            "tenants": tenants_for(request.user).order_by("name").only("slug", "name"),
            "tenant": request.GET.get("tenant", ""),
            "range_key": request.GET.get("range", ""),
            "group_by": (),
        }
        return _bad_filters(request, "console/usage.html", form, context)
    query, shown = _usage_query(request, form.cleaned_data)
    try:
        report = usage_report(query, as_of=_data_as_of())
    except ReportError as error:
        raise Http404(str(error)) from None
    rows = report_rows(report)
    if form.cleaned_data["format"] == "csv":
        return _csv(rows)
    totals: dict[str, Any] = {
        name: sum(int(row.get(name) or 0) for row in rows)
        for name in ("num_model_requests", "errors", "input_tokens", "output_tokens")
    }
    totals["cost_usd"] = sum((Decimal(str(row.get("cost_usd") or 0)) for row in rows), Decimal(0))
    context = {
        "section": "usage",
        "rows": rows,
        "totals": totals,
        "as_of": report["data_as_of"],
        "ranges": [(key, value[0]) for key, value in USAGE_RANGES.items()],
        "groups": GROUPS,
        "tenants": tenants_for(request.user).order_by("name").only("slug", "name"),
        "tenant": request.GET.get("tenant", ""),
        "form": form,
        "csv_url": _query_with(request, format="csv"),
        **shown,
    }
    return render(request, "console/usage.html", context)


def _data_as_of() -> datetime | None:
    return data_as_of()


def _csv(rows: list[dict[str, Any]]) -> HttpResponse:
    """The report's rows as CSV (the API's columns: tenancy.reports.REPORT_CSV_COLUMNS)."""
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="usage.csv"'
    writer = csv.DictWriter(response, fieldnames=REPORT_CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({name: _cell(row.get(name)) for name in REPORT_CSV_COLUMNS})
    return response


def _cell(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return " ".join(str(item) for item in value)
    return "" if value is None else value
