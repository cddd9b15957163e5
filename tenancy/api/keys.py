"""``/api/v1/keys/``: the data-plane API keys of the caller's tenants.

Create answers the secret once (``key``); PATCH changes the name, allowed models, expiry,
limits and policy (a limit never above the tenant's own); DELETE revokes (the row stays,
with ``revoked_at``). Owners and admins write, viewers read, outsiders get 404.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import serializers, status
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from tenancy.access import require_manage, tenant_or_404
from tenancy.api.base import TENANT_FILTER, ManagedViewSet, validated
from tenancy.api.fields import KEY_LIMITS, KeyLimitsSerializer, pick
from tenancy.models import ApiKey
from tenancy.services.keys import (
    ROTATION_GRACE_MAX_SECONDS,
    UNCHANGED,
    apikey_create,
    apikey_details_set,
    apikey_revoke,
    apikey_rotate,
    apikey_update,
)


class ApiKeySerializer(serializers.ModelSerializer[ApiKey]):
    tenant: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(slug_field="slug", read_only=True)

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "tenant",
            "name",
            "prefix",
            "allowed_models",
            "created_at",
            "expires_at",
            "revoked_at",
            "last_used_at",
            *KEY_LIMITS,
        ]
        read_only_fields = fields


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.CharField(help_text="The secret key itself: shown only in this response.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]
        read_only_fields = fields


class ApiKeyDetailsSerializer(KeyLimitsSerializer):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True)
    allowed_models = serializers.ListField(
        child=serializers.CharField(max_length=200), required=False, allow_null=True, help_text="null or []: all."
    )
    expires_at = serializers.DateTimeField(required=False, allow_null=True)


class ApiKeyRotateSerializer(serializers.Serializer[ApiKey]):
    grace_seconds = serializers.IntegerField(
        min_value=0,
        max_value=ROTATION_GRACE_MAX_SECONDS,
        default=0,
        help_text="How long the old secret stays valid (0: refused from the next request on).",
    )


class ApiKeyRotatedSerializer(ApiKeyCreatedSerializer):
    previous_valid_until = serializers.DateTimeField(allow_null=True, help_text="When the old secret stops working.")

    class Meta(ApiKeyCreatedSerializer.Meta):
        fields = [*ApiKeyCreatedSerializer.Meta.fields, "previous_valid_until"]
        read_only_fields = fields


class ApiKeyCreateSerializer(ApiKeyDetailsSerializer):
    tenant = serializers.CharField(help_text="The tenant's slug or id.")


_FILTERS = [
    TENANT_FILTER,
    OpenApiParameter("revoked", bool, description="true: only revoked keys; false: only usable ones."),
]


@extend_schema_view(list=extend_schema(parameters=_FILTERS))
class ApiKeyViewSet(ManagedViewSet):
    serializer_class = ApiKeySerializer

    def get_queryset(self) -> QuerySet[ApiKey]:
        keys = self.scoped(ApiKey.objects.select_related("tenant"))
        if self.action == "list":
            revoked = self.request.query_params.get("revoked", "").lower()
            if revoked in ("true", "1"):
                keys = keys.filter(revoked_at__isnull=False)
            elif revoked in ("false", "0"):
                keys = keys.filter(revoked_at__isnull=True)
        return keys

    @extend_schema(request=ApiKeyCreateSerializer, responses={201: ApiKeyCreatedSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = validated(ApiKeyCreateSerializer, request)
        tenant = tenant_or_404(request.user, data["tenant"])
        require_manage(request.user, tenant)
        api_key, secret = apikey_create(
            tenant=tenant,
            name=data.get("name", ""),
            allowed_models=data.get("allowed_models"),
            expires_at=data.get("expires_at"),
            **pick(data, KEY_LIMITS),
        )
        answer = ApiKeySerializer(api_key).data
        answer["key"] = secret
        return Response(answer, status=status.HTTP_201_CREATED)

    @extend_schema(request=ApiKeyDetailsSerializer, responses=ApiKeySerializer)
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        api_key = self.get_object()
        require_manage(request.user, api_key.tenant)
        body = ApiKeyDetailsSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        with transaction.atomic():
            apikey_details_set(
                api_key=api_key,
                name=data.get("name", UNCHANGED),
                allowed_models=data.get("allowed_models", UNCHANGED),
                expires_at=data.get("expires_at", UNCHANGED),
            )
            apikey_update(api_key=api_key, **pick(data, KEY_LIMITS))
        return Response(ApiKeySerializer(api_key).data)

    @extend_schema(
        request=ApiKeyRotateSerializer,
        responses=ApiKeyRotatedSerializer,
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                str,
                OpenApiParameter.HEADER,
                description="A retry with the same value (and body) within a day answers the same new secret.",
            )
        ],
    )
    @action(detail=True, methods=["post"])
    def rotate(self, request: Request, pk: str | None = None) -> Response:
        """A new secret for the key (answered once, in ``key``); the key keeps its id, limits and
        usage, and the old secret works until ``previous_valid_until``."""
        api_key = self.get_object()
        require_manage(request.user, api_key.tenant)
        data = validated(ApiKeyRotateSerializer, request)
        idempotency = request.headers.get("Idempotency-Key", "").strip()
        try:
            api_key, secret = apikey_rotate(
                api_key=api_key, grace_seconds=data["grace_seconds"], idempotency_key=idempotency
            )
        except DjangoValidationError as exc:
            if getattr(exc, "code", None) == "idempotency_conflict":
                return Response({"detail": " ".join(exc.messages)}, status=status.HTTP_409_CONFLICT)
            raise
        answer = ApiKeySerializer(api_key).data
        answer["key"] = secret
        until = api_key.previous_valid_until
        answer["previous_valid_until"] = serializers.DateTimeField().to_representation(until) if until else None
        return Response(answer)

    @extend_schema(responses={204: None})
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        api_key = self.get_object()
        require_manage(request.user, api_key.tenant)
        apikey_revoke(api_key=api_key)
        return Response(status=status.HTTP_204_NO_CONTENT)
