"""Billing reads: ``/api/v1/reports/usage``, ``/api/v1/reports/reconciliation``, statements.

- ``GET /api/v1/reports/usage``: usage per hour, day or month in a time zone, grouped by any of
  tenant, key, model, account; shaped like OpenAI's usage API (a page of buckets with results).
  Every member reads their tenants' usage (an operator every tenant's); ``?tenant=`` another's: 404.
- ``GET /api/v1/reports/reconciliation``: per upstream account and day (operators only).
- ``/api/v1/statements/``: closed monthly statements (members read theirs; operators close a
  month with ``POST``); ``GET /api/v1/tenants/{id}/statement/`` the statement of a month as it
  stands, or of any range (tenancy.api.tenants).

``?format=csv`` answers the same rows as CSV. Every answer says ``data_as_of``: the rollups hold
every record inserted before it (also the ``X-Data-As-Of`` header).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import QuerySet
from django.http import Http404
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins, serializers, status
from rest_framework.exceptions import ValidationError
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.infra.api import ApiViewMixin, IsOperator
from tenancy.access import is_operator, tenant_or_404, tenants_for
from tenancy.api.base import ScopedViewSet, when
from tenancy.billing import bucket_ceil, time_zone_validate
from tenancy.models import Statement, Tenant
from tenancy.reports import (
    REPORT_CSV_COLUMNS,
    ReportError,
    ReportQuery,
    reconciliation,
    report_rows,
    usage_report,
)
from tenancy.services.rollups import data_as_of
from tenancy.services.statements import statement_as_dict, statement_close

RECONCILIATION_MAX_DAYS = 31
STATEMENT_CSV_COLUMNS = (
    "section",
    "month",
    "model",
    "price_version_id",
    "kind",
    "tokens",
    "usd_per_million",
    "amount_usd",
    "amount_pusd",
)


class CSVRenderer(BaseRenderer):
    """``?format=csv``: the view's rows (``view.csv_rows(data)``) under ``view.csv_columns``.

    An error answer becomes ``field,message`` rows.
    """

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        context = renderer_context or {}
        view, response = context.get("view"), context.get("response")
        out = io.StringIO()
        if (response is not None and response.status_code >= 400) or view is None or not hasattr(view, "csv_rows"):
            writer = csv.writer(out)
            writer.writerow(["field", "message"])
            for name, message in (data or {}).items() if isinstance(data, Mapping) else []:
                writer.writerow([name, " ".join(map(str, message)) if isinstance(message, list) else message])
            return out.getvalue().encode()
        dict_writer = csv.DictWriter(out, fieldnames=list(view.csv_columns), extrasaction="ignore")
        dict_writer.writeheader()
        for row in view.csv_rows(data):
            dict_writer.writerow({k: _cell(v) for k, v in row.items()})
        return out.getvalue().encode()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


RENDERERS = [JSONRenderer, CSVRenderer]


def _param_list(request: Request, name: str) -> tuple[str, ...]:
    """A comma-separated and/or repeated query parameter (``group_by=a,b`` or ``group_by[]=a``)."""
    raw = [*request.query_params.getlist(name), *request.query_params.getlist(f"{name}[]")]
    return tuple(dict.fromkeys(part.strip() for item in raw for part in item.split(",") if part.strip()))


def _time_zone(request: Request, tenant: Tenant | None) -> str:
    """``?time_zone=``, else the tenant's (the one asked for, or the caller's only one), else UTC."""
    given = request.query_params.get("time_zone")
    if given:
        try:
            return time_zone_validate(given)
        except ValueError as exc:
            raise ValidationError({"time_zone": str(exc)}) from None
    if tenant is not None:
        return tenant.time_zone
    if not is_operator(request.user):
        zones = set(tenants_for(request.user).values_list("time_zone", flat=True)[:2])
        if len(zones) == 1:
            return zones.pop()
    return "UTC"


def _bool(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


def as_of_header(as_of: datetime | None) -> dict[str, str]:
    """The ``X-Data-As-Of`` header of a billing answer."""
    return {"X-Data-As-Of": as_of.isoformat() if as_of else "never"}


def _with_as_of(response: Response, as_of: datetime | None) -> Response:
    for name, value in as_of_header(as_of).items():
        response[name] = value
    return response


def _range(request: Request, default_days: int) -> tuple[datetime, datetime]:
    end = when(request.query_params, "to")
    start = when(request.query_params, "from")
    if end is None:
        end = bucket_ceil(timezone.now())
    if start is None:
        start = end - timedelta(days=default_days)
    return start, end


USAGE_PARAMETERS = [
    OpenApiParameter(
        "from", str, description="Start (ISO 8601 with offset, on a 15-minute boundary); default: `to` minus 7 days."
    ),
    OpenApiParameter("to", str, description="End, exclusive (default: now, rounded up to 15 minutes)."),
    OpenApiParameter("granularity", str, enum=["hour", "day", "month"], description="Bucket width (default day)."),
    OpenApiParameter("group_by", str, description="Comma-separated: any of tenant, key, model, account."),
    OpenApiParameter("tenant", str, description="Only this tenant (slug or id)."),
    OpenApiParameter("time_zone", str, description="IANA zone of the buckets (default: the tenant's, else UTC)."),
    OpenApiParameter("percentiles", bool, description="Also latency and TTFB p50/p90/p99 (ms)."),
    OpenApiParameter("format", str, enum=["json", "csv"], description="csv: the same rows as CSV."),
]


class UsageReportView(ApiViewMixin, APIView):
    """Usage per hour, day or month, grouped by tenant, key, model and/or account."""

    permission_classes = [IsAuthenticated]
    renderer_classes = RENDERERS
    csv_columns = REPORT_CSV_COLUMNS

    def csv_rows(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        return report_rows(data)

    @extend_schema(parameters=USAGE_PARAMETERS, responses={200: OpenApiResponse(description="A page of buckets.")})
    def get(self, request: Request) -> Response:
        tenant_param = request.query_params.get("tenant")
        tenant = tenant_or_404(request.user, tenant_param) if tenant_param else None
        if tenant is not None:
            tenant_ids: Sequence[int] | None = [tenant.pk]
        else:
            tenant_ids = (
                None if is_operator(request.user) else list(tenants_for(request.user).values_list("id", flat=True))
            )
        start, end = _range(request, 7)
        query = ReportQuery(
            tenant_ids=tenant_ids,
            start=start,
            end=end,
            time_zone=_time_zone(request, tenant),
            granularity=request.query_params.get("granularity") or "day",
            group_by=_param_list(request, "group_by"),
            percentiles=_bool(request, "percentiles"),
        )
        as_of = data_as_of()
        try:
            report = usage_report(query, as_of=as_of)
        except ReportError as exc:
            raise ValidationError({exc.field: str(exc)}) from None
        return _with_as_of(Response(report), as_of)


class ReconciliationView(ApiViewMixin, APIView):
    """Per upstream account and UTC day: metered (rollups) against reported (the attempts of the
    records), and the records whose usage is unknown. Operators only."""

    permission_classes = [IsOperator]
    renderer_classes = RENDERERS
    csv_columns = (
        "account_id",
        "day",
        "metered_attempts",
        "metered_tokens",
        "reported_attempts",
        "reported_tokens",
        "difference_tokens",
        "unknown_usage_records",
        "unknown_usage_request_ids",
        "matches",
    )

    def csv_rows(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        return list(data["data"])

    @extend_schema(
        parameters=[
            OpenApiParameter("from", str, description="Start (ISO 8601 with offset); default: `to` minus 1 day."),
            OpenApiParameter("to", str, description="End, exclusive (default now); at most 31 days."),
            OpenApiParameter("account", int, description="Only this upstream account (its id)."),
            OpenApiParameter("format", str, enum=["json", "csv"]),
        ],
        responses={200: OpenApiResponse(description="Rows per account and day.")},
    )
    def get(self, request: Request) -> Response:
        start, end = _range(request, 1)
        if end <= start or end - start > timedelta(days=RECONCILIATION_MAX_DAYS):
            raise ValidationError({"to": f"after from, and at most {RECONCILIATION_MAX_DAYS} days after it."})
        account = request.query_params.get("account")
        if account is not None and not account.isdigit():
            raise ValidationError({"account": "an account id."})
        as_of = data_as_of()
        body = reconciliation(start=start, end=end, account_id=int(account) if account else None)
        body["data_as_of"] = as_of.isoformat() if as_of else None
        return _with_as_of(Response(body), as_of)


class StatementCloseSerializer(serializers.Serializer[Any]):
    tenant = serializers.CharField(help_text="slug or id")
    month = serializers.RegexField(r"^\d{4}-\d{2}$", help_text="YYYY-MM in the tenant's time zone")


class StatementSerializer(serializers.ModelSerializer[Statement]):
    def to_representation(self, instance: Statement) -> dict[str, Any]:
        return statement_as_dict(instance)

    class Meta:
        model = Statement
        fields = ["id"]


def statement_csv_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [{"section": "line", "month": data.get("month"), **line} for line in data["lines"]]
    rows += [{"section": "adjustment", **item} for item in data["adjustments"]]
    totals = data["totals"]
    rows.append(
        {
            "section": "total",
            "month": data.get("month"),
            "amount_usd": totals["total_usd"],
            "amount_pusd": totals["total_pusd"],
        }
    )
    return rows


class StatementViewSet(ScopedViewSet, mixins.CreateModelMixin):
    """Closed statements of the caller's tenants; ``POST`` closes a month (operators only)."""

    serializer_class = StatementSerializer
    http_method_names = ["get", "post", "head", "options"]
    renderer_classes = RENDERERS
    csv_columns = STATEMENT_CSV_COLUMNS

    def csv_rows(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        if "lines" in data:
            return statement_csv_rows(data)
        return [row for item in data.get("results", []) for row in statement_csv_rows(item)]

    def get_queryset(self) -> QuerySet[Statement]:
        return self.scoped(Statement.objects.select_related("tenant"))

    @extend_schema(request=StatementCloseSerializer, responses={201: StatementSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        if not is_operator(request.user):
            return Response({"detail": "Only platform operators close statements."}, status=status.HTTP_403_FORBIDDEN)
        body = StatementCloseSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            tenant = tenant_or_404(request.user, body.validated_data["tenant"])
        except Http404:
            raise ValidationError({"tenant": "no such tenant."}) from None
        with transaction.atomic():
            statement = statement_close(tenant=tenant, month=body.validated_data["month"])
        return Response(statement_as_dict(statement), status=status.HTTP_201_CREATED)
