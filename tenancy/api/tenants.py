"""``/api/v1/tenants/``: tenants the caller can see; operators create them, suspend them and set
their limits and budgets (which only operators set: a tenant admin gets 403)."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from tenancy.access import is_operator, tenants_for
from tenancy.api.base import ScopedViewSet, when
from tenancy.api.fields import TENANT_LIMITS, LimitsSerializer, pick
from tenancy.api.reports import RENDERERS, STATEMENT_CSV_COLUMNS, as_of_header, statement_csv_rows
from tenancy.billing import is_bucket_aligned, zone
from tenancy.models import Tenant
from tenancy.services.rollups import data_as_of
from tenancy.services.statements import statement_compute, statement_range
from tenancy.services.tenants import tenant_create, tenant_details_set, tenant_update


class TenantSerializer(serializers.ModelSerializer[Tenant]):
    class Meta:
        model = Tenant
        fields = ["id", "slug", "name", "is_active", "time_zone", "created_at", *TENANT_LIMITS]
        read_only_fields = fields


class TenantCreateSerializer(LimitsSerializer):
    slug = serializers.CharField(max_length=64)
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    time_zone = serializers.CharField(
        max_length=64, required=False, default="UTC", help_text="IANA reporting time zone (days, months, statements)."
    )


class TenantUpdateSerializer(LimitsSerializer):
    name = serializers.CharField(max_length=200, required=False)
    is_active = serializers.BooleanField(required=False, help_text="false suspends the tenant: every key refused.")
    time_zone = serializers.CharField(max_length=64, required=False, help_text="IANA reporting time zone.")


def _operator_only(request: Request) -> None:
    if not is_operator(request.user):
        raise PermissionDenied("Only platform operators create tenants or change their limits.")


class TenantViewSet(ScopedViewSet):
    """Tenants: read by their members, written by operators. PATCH with ``is_active: false`` suspends."""

    serializer_class = TenantSerializer
    http_method_names = ["get", "post", "patch", "head", "options"]

    def get_queryset(self) -> QuerySet[Tenant]:
        return tenants_for(self.request.user)

    @extend_schema(request=TenantCreateSerializer, responses={201: TenantSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        _operator_only(request)
        body = TenantCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        tenant = tenant_create(
            slug=data["slug"], name=data["name"], time_zone=data["time_zone"], **pick(data, TENANT_LIMITS)
        )
        return Response(TenantSerializer(tenant).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=TenantUpdateSerializer, responses=TenantSerializer)
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        tenant = self.get_object()  # 404 first: an outsider learns nothing
        _operator_only(request)
        body = TenantUpdateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        with transaction.atomic():
            tenant_details_set(
                tenant=tenant, name=data.get("name"), is_active=data.get("is_active"), time_zone=data.get("time_zone")
            )
            tenant_update(tenant=tenant, **pick(data, TENANT_LIMITS))
        return Response(TenantSerializer(tenant).data)

    @extend_schema(
        parameters=[
            OpenApiParameter("month", str, description="YYYY-MM in the tenant's time zone (default: this month)."),
            OpenApiParameter("from", str, description="Or any range: start (ISO 8601, on a 15-minute boundary)."),
            OpenApiParameter("to", str, description="End of the range, exclusive."),
            OpenApiParameter("format", str, enum=["json", "csv"]),
        ],
        responses={200: OpenApiResponse(description="The statement: lines, adjustments, totals.")},
    )
    @action(detail=True, methods=["get"], renderer_classes=RENDERERS)
    def statement(self, request: Request, pk: str | None = None) -> Response:
        """The tenant's statement of a month as it stands (closed: as closed), or of any range."""
        tenant = self.get_object()
        params = request.query_params
        start, end = when(params, "from"), when(params, "to")
        as_of = data_as_of()
        if start is not None or end is not None:
            if start is None or end is None or end <= start:
                raise ValidationError({"to": "from and to together, to after from."})
            if not (is_bucket_aligned(start) and is_bucket_aligned(end)):
                raise ValidationError({"from": "from and to must be on 15-minute boundaries."})
            return Response(statement_range(tenant, start, end), headers=as_of_header(as_of))
        month = params.get("month") or timezone.now().astimezone(zone(tenant.time_zone)).strftime("%Y-%m")
        return Response(statement_compute(tenant, month), headers=as_of_header(as_of))

    csv_columns = STATEMENT_CSV_COLUMNS

    def csv_rows(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        return statement_csv_rows(data)
