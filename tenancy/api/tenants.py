"""``/api/v1/tenants/``: tenants the caller can see; operators create them, suspend them and set
their limits and budgets (which only operators set: a tenant admin gets 403)."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response

from tenancy.access import is_operator, tenants_for
from tenancy.api.base import ScopedViewSet
from tenancy.api.fields import TENANT_LIMITS, LimitsSerializer, pick
from tenancy.models import Tenant
from tenancy.services.tenants import tenant_create, tenant_details_set, tenant_update


class TenantSerializer(serializers.ModelSerializer[Tenant]):
    class Meta:
        model = Tenant
        fields = ["id", "slug", "name", "is_active", "created_at", *TENANT_LIMITS]
        read_only_fields = fields


class TenantCreateSerializer(LimitsSerializer):
    slug = serializers.CharField(max_length=64)
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")


class TenantUpdateSerializer(LimitsSerializer):
    name = serializers.CharField(max_length=200, required=False)
    is_active = serializers.BooleanField(required=False, help_text="false suspends the tenant: every key refused.")


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
        tenant = tenant_create(slug=data["slug"], name=data["name"], **pick(data, TENANT_LIMITS))
        return Response(TenantSerializer(tenant).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=TenantUpdateSerializer, responses=TenantSerializer)
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        tenant = self.get_object()  # 404 first: an outsider learns nothing
        _operator_only(request)
        body = TenantUpdateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        with transaction.atomic():
            tenant_details_set(tenant=tenant, name=data.get("name"), is_active=data.get("is_active"))
            tenant_update(tenant=tenant, **pick(data, TENANT_LIMITS))
        return Response(TenantSerializer(tenant).data)
