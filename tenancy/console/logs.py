"""The request log (with one request's page), the audit log and usage: read-only pages.

Members read their tenants' requests and usage; the audit log is for operators and the owners
and admins of a tenant (as in the API). Pages are newest first with keyset pagination
(``?before=<created_at>,<id>``): a page is one index range read, never an OFFSET or a COUNT
over millions of rows. Usage is read from the 15-minute rollups (tenancy/reports.py), never from
the raw records.
"""

from __future__ import annotations

import csv
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from tenancy.access import tenant_ids_for, tenant_or_404, tenants_for
from tenancy.console.common import console_view
from tenancy.pricing import TOKEN_FIELDS
from tenancy.reports import REPORT_CSV_COLUMNS, ReportError, ReportQuery, report_rows, usage_report
from tenancy.selectors import RecordFilter, audit_entries_visible, usage_records_visible
from tenancy.services.rollups import data_as_of

LOG_PAGE = 50
# The usage page's ranges: label and length (the end is the next 15-minute boundary).
USAGE_RANGES = {"24h": ("Last 24 hours", timedelta(hours=24)), "7d": ("Last 7 days", timedelta(days=7))}
USAGE_RANGES["30d"] = ("Last 30 days", timedelta(days=30))
GROUPS = ("tenant", "key", "model", "account")


def _number(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() and len(text) <= 18 else None


def _moment(text: str | None) -> datetime | None:
    """A date (``YYYY-MM-DD``, UTC midnight) or an ISO datetime; None when absent or unreadable."""
    if not text:
        return None
    moment = parse_datetime(text) or parse_datetime(text + "T00:00:00")
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _keyset(rows: Any, before: str | None, *, field: str = "created_at") -> tuple[list[Any], str]:
    """One newest-first page of ``rows`` after the cursor ``before`` (``<iso time>,<id>``) and the
    cursor of the next page ("" when this is the last)."""
    if before:
        moment_text, _, pk_text = before.rpartition(",")
        moment, pk = _moment(moment_text), _number(pk_text)
        if moment is not None and pk is not None:
            rows = rows.filter(**{f"{field}__lt": moment}) | rows.filter(**{field: moment, "pk__lt": pk})
    page = list(rows.order_by(f"-{field}", "-pk")[: LOG_PAGE + 1])
    if len(page) <= LOG_PAGE:
        return page, ""
    page = page[:LOG_PAGE]
    last = page[-1]
    return page, f"{getattr(last, field).isoformat()},{last.pk}"


def _query_with(request: HttpRequest, **changes: str) -> str:
    query = request.GET.copy()
    for name, value in changes.items():
        query[name] = value
    return "?" + query.urlencode()


@console_view
def request_list(request: HttpRequest) -> HttpResponse:
    """The request log: filters, search by request id, newest first."""
    user = request.user
    get = request.GET
    tenant = tenant_or_404(user, get["tenant"]) if get.get("tenant") else None
    wanted = RecordFilter(
        tenant_id=tenant.pk if tenant else None,
        api_key_id=_number(get.get("key")),
        account_id=_number(get.get("account")),
        status_code=_number(get.get("status")),
        model=get.get("model", "").strip(),
        request_id=get.get("request_id", "").strip(),
        start=_moment(get.get("from")),
        end=_moment(get.get("to")),
    )
    records, cursor = _keyset(usage_records_visible(tenant_ids_for(user), wanted), get.get("before"))
    context = {
        "section": "requests",
        "records": records,
        "next_url": _query_with(request, before=cursor) if cursor else "",
        "first_url": _query_with(request, before="") if get.get("before") else "",
        "tenants": tenants_for(user).order_by("name").only("slug", "name"),
        "filters": {name: get.get(name, "") for name in RECORD_FILTERS},
        "from": get.get("from", ""),
        "to": get.get("to", ""),
        "filtered": any(get.get(name) for name in (*RECORD_FILTERS, "from", "to")),
    }
    return render(request, "console/requests.html", context)


RECORD_FILTERS = ("tenant", "key", "account", "status", "model", "request_id")


@console_view
def request_detail(request: HttpRequest, request_id: str) -> HttpResponse:
    """One request as metered: answer, tokens by kind, cost, timings and every attempt."""
    record = usage_records_visible(tenant_ids_for(request.user), RecordFilter(request_id=request_id)).first()
    if record is None:
        raise Http404("No such request.")
    tokens = [(name.replace("_", " "), getattr(record, name)) for name in TOKEN_FIELDS]
    context = {"section": "requests", "record": record, "tokens": tokens, "attempts": record.attempts or []}
    return render(request, "console/request.html", context)


@console_view
def audit_list(request: HttpRequest) -> HttpResponse:
    """Who changed what, when, with the values before and after."""
    user = request.user
    entries = audit_entries_visible(user)
    if request.GET.get("tenant"):
        entries = entries.filter(tenant_id=tenant_or_404(user, request.GET["tenant"]).pk)
    if request.GET.get("action"):
        entries = entries.filter(action=request.GET["action"])
    page, cursor = _keyset(entries, request.GET.get("before"))
    context = {
        "section": "audit",
        "entries": page,
        "next_url": _query_with(request, before=cursor) if cursor else "",
        "first_url": _query_with(request, before="") if request.GET.get("before") else "",
        "tenants": tenants_for(user).order_by("name").only("slug", "name"),
        "tenant": request.GET.get("tenant", ""),
        "action": request.GET.get("action", ""),
    }
    return render(request, "console/audit.html", context)


def _usage_query(request: HttpRequest) -> tuple[ReportQuery, dict[str, Any]]:
    """The usage page's report query (from the rollups) and what the page shows of it."""
    user = request.user
    range_key = request.GET.get("range", "7d")
    if range_key not in USAGE_RANGES:
        range_key = "7d"
    label, length = USAGE_RANGES[range_key]
    now = timezone.now()
    end = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0) + timedelta(minutes=15)
    group_by = tuple(name for name in GROUPS if name in request.GET.getlist("group_by")) or ("tenant", "model")
    tenant_ids: Any = tenant_ids_for(user)
    if request.GET.get("tenant"):
        tenant_ids = [tenant_or_404(user, request.GET["tenant"]).pk]
    elif tenant_ids is not None:
        tenant_ids = list(tenant_ids)
    query = ReportQuery(
        tenant_ids=tenant_ids, start=end - length, end=end, time_zone="UTC", granularity="day", group_by=group_by
    )
    shown = {"range_key": range_key, "range_label": label, "group_by": group_by}
    return query, shown


@console_view
def usage(request: HttpRequest) -> HttpResponse:
    """Usage per day over a range, grouped by tenant, key, model or account; CSV export."""
    query, shown = _usage_query(request)
    try:
        report = usage_report(query, as_of=_data_as_of())
    except ReportError as error:
        raise Http404(str(error)) from None
    rows = report_rows(report)
    if request.GET.get("format") == "csv":
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
