"""``/api/v1/tokens/``: the caller's personal access tokens (list, create: shown once, revoke)."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from accounts.infra.api import ApiViewMixin, IdCursorPagination
from tenancy.models import AccessToken
from tenancy.services.tokens import MAX_TOKEN_DAYS, access_token_create, access_token_revoke


class TokenSerializer(serializers.ModelSerializer[AccessToken]):
    class Meta:
        model = AccessToken
        fields = ["id", "name", "prefix", "created_at", "expires_at", "revoked_at", "last_used_at"]
        read_only_fields = fields


class TokenCreateSerializer(serializers.Serializer[AccessToken]):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    expires_in_days = serializers.IntegerField(
        min_value=1, max_value=MAX_TOKEN_DAYS, required=False, allow_null=True, default=None
    )


class TokenCreatedSerializer(TokenSerializer):
    token = serializers.CharField(help_text="The token itself: shown only in this response.")

    class Meta(TokenSerializer.Meta):
        fields = [*TokenSerializer.Meta.fields, "token"]
        read_only_fields = fields


class TokenViewSet(
    ApiViewMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet
):
    """The caller's own tokens. DELETE revokes (the row stays, with ``revoked_at``)."""

    permission_classes = [IsAuthenticated]
    serializer_class = TokenSerializer
    pagination_class = IdCursorPagination

    def get_queryset(self) -> QuerySet[AccessToken]:
        return AccessToken.objects.filter(user_id=self.request.user.pk or 0)

    @extend_schema(request=TokenCreateSerializer, responses={201: TokenCreatedSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = TokenCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        token, secret = access_token_create(user=request.user, **data.validated_data)  # type: ignore[arg-type]
        body = TokenSerializer(token).data
        body["token"] = secret
        return Response(body, status=status.HTTP_201_CREATED)

    @extend_schema(responses={204: None})
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        access_token_revoke(token=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)
