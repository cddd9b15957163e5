"""Read-only logs: ``/api/v1/audit/`` (who changed what) and ``/api/v1/usage/records/`` (the
request log). Newest first, cursor pagination (the request log: keyset on ``(created_at, id)``,
tenancy.api.base.TimeKeysetPagination), filters in the query string.

The audit log: operators read all of it; owners and admins their tenants' entries (viewers
none). Nothing edits or deletes it. The request log: every member reads their tenants'.
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from tenancy.access import tenant_ids_for, tenant_or_404
from tenancy.api.base import ScopedViewSet, TimeKeysetPagination, in_time_range, timed_list, when, whole
from tenancy.models import AuditEntry, UsageRecord
from tenancy.pricing import TOKEN_FIELDS
from tenancy.selectors import (
    USAGE_NEWEST_FIRST,
    RecordFilter,
    audit_entries_visible,
    usage_records_page,
    usage_records_visible,
)


class AuditEntrySerializer(serializers.ModelSerializer[AuditEntry]):
    class Meta:
        model = AuditEntry
        fields = "__all__"  # every column: who, from where, what, before and after
        read_only_fields = [field.name for field in AuditEntry._meta.fields]


@timed_list(
    OpenApiParameter("action", str, description='e.g. "apikey.revoke".'),
    OpenApiParameter("target_type", str, description='e.g. "apikey", "tenant", "membership".'),
    OpenApiParameter("actor", int, description="The acting user's id."),
)
class AuditViewSet(ScopedViewSet):
    serializer_class = AuditEntrySerializer

    def get_queryset(self) -> QuerySet[AuditEntry]:
        user = self.request.user
        entries = audit_entries_visible(user)
        if self.action != "list":
            return entries
        params = self.request.query_params
        if params.get("tenant"):
            entries = entries.filter(tenant_id=tenant_or_404(user, params["tenant"]).pk)
        for name, lookup in (("action", "action"), ("target_type", "target_type")):
            if params.get(name):
                entries = entries.filter(**{lookup: params[name]})
        actor = whole(params, "actor")
        if actor is not None:
            entries = entries.filter(actor_id=actor)
        return in_time_range(entries, params)


class UsageRecordSerializer(serializers.ModelSerializer[UsageRecord]):
    tenant: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    key_prefix = serializers.CharField(source="api_key.prefix", read_only=True, allow_null=True, default=None)

    class Meta:
        model = UsageRecord
        fields = [
            "id",
            "request_id",
            "created_at",
            "tenant",
            "api_key",
            "key_prefix",
            "account",
            "model",
            "status_code",
            "outcome",
            "stream",
            "response_id",
            *TOKEN_FIELDS,
            "cost",
            "latency_ms",
            "ttfb_ms",
            "attempts",
        ]
        read_only_fields = fields


@timed_list(
    OpenApiParameter("key", int, description="Only this API key's requests (its id)."),
    OpenApiParameter("account", int, description="Only requests served by this upstream account (its id)."),
    OpenApiParameter("model", str, description="Only this public model."),
    OpenApiParameter("status", int, description="Only answers with this HTTP status."),
    OpenApiParameter("request_id", str, description="The one request with this x-request-id."),
)
class UsageRecordViewSet(ScopedViewSet):
    """The request log: one record per request, as metered; newest first by ``(created_at,
    id)``, keyset pages (the console's request log's selector and indexes)."""

    serializer_class = UsageRecordSerializer
    pagination_class = TimeKeysetPagination

    def get_queryset(self) -> QuerySet[UsageRecord]:
        return usage_records_visible(tenant_ids_for(self.request.user), RecordFilter())

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        params = request.query_params
        tenant = tenant_or_404(request.user, params["tenant"]).pk if params.get("tenant") else None
        wanted = RecordFilter(
            tenant_id=tenant,
            api_key_id=whole(params, "key"),
            account_id=whole(params, "account"),
            status_code=whole(params, "status"),
            model=params.get("model", ""),
            request_id=params.get("request_id", ""),
            start=when(params, "from"),
            end=when(params, "to"),
        )
        paginator = TimeKeysetPagination()
        after, before = paginator.positions(request)
        page = usage_records_page(
            tenant_ids_for(request.user),
            wanted,
            USAGE_NEWEST_FIRST,
            after=after,
            before=before,
            size=paginator.size(request),
        )
        paginator.keep(request, page)
        return paginator.get_paginated_response(self.get_serializer(page.rows, many=True).data)
