"""The supply side's endpoints, operators only (any other caller: 403 before any lookup).

``/api/v1/pools/``: pools and how they spread traffic. ``/api/v1/accounts/``: upstream
accounts; the credential is write-only (``api_key`` is accepted, never answered: an answer
says ``credential_set`` only), each account's current health, and
``/api/v1/accounts/{id}/transitions/`` its health history. ``/api/v1/routes/``: which pools
serve a public model, in failover order. Every write goes through ``accounts.services``
(audited; a change reaches every gateway on its next request).
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from accounts.infra.api import ApiViewMixin, IdCursorPagination, IsOperator
from accounts.models import AccountTransition, ModelRoute, Pool, UpstreamAccount
from accounts.selectors import account_health_states
from accounts.services import (
    UNCHANGED,
    model_route_delete,
    model_route_set,
    pool_delete,
    pool_get_or_create,
    pool_set_strategy,
    pool_set_strip_fields,
    upstream_account_create,
    upstream_account_probe,
    upstream_account_update,
)


class OperatorViewSet(ApiViewMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    permission_classes = [IsOperator]
    pagination_class = IdCursorPagination
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]


def _body(serializer: type[serializers.Serializer[Any]], request: Request) -> dict[str, Any]:
    body = serializer(data=request.data)
    body.is_valid(raise_exception=True)
    return dict(body.validated_data)


# --- pools ------------------------------------------------------------------------------------


class PoolSerializer(serializers.ModelSerializer[Pool]):
    class Meta:
        model = Pool
        fields = ["id", "name", "strategy", "strip_fields", "created_at"]
        read_only_fields = fields


class PoolWriteSerializer(serializers.Serializer[Pool]):
    strategy = serializers.ChoiceField(choices=Pool.Strategy.choices, required=False)
    strip_fields = serializers.ListField(
        child=serializers.CharField(max_length=64), required=False, allow_null=True, help_text="null: the default list."
    )


class PoolCreateSerializer(PoolWriteSerializer):
    name = serializers.CharField(max_length=64)


def _pool_settings(pool: Pool, data: dict[str, Any]) -> None:
    if "strategy" in data:
        pool_set_strategy(pool=pool, strategy=data["strategy"])
    if "strip_fields" in data:
        pool_set_strip_fields(pool=pool, fields=data["strip_fields"])


class PoolViewSet(OperatorViewSet, mixins.DestroyModelMixin):
    serializer_class = PoolSerializer
    queryset = Pool.objects.all()
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    @extend_schema(responses={204: None, 400: OpenApiTypes.OBJECT})
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Delete an empty pool; 400 naming its accounts or routes otherwise."""
        pool_delete(pool=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=PoolCreateSerializer, responses={201: PoolSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = _body(PoolCreateSerializer, request)
        with transaction.atomic():
            pool = pool_get_or_create(name=data["name"])
            _pool_settings(pool, data)
        return Response(PoolSerializer(pool).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=PoolWriteSerializer, responses=PoolSerializer)
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        pool = self.get_object()
        with transaction.atomic():
            _pool_settings(pool, _body(PoolWriteSerializer, request))
        return Response(PoolSerializer(pool).data)


# --- accounts ---------------------------------------------------------------------------------


class HealthSerializer(serializers.Serializer[object]):
    state = serializers.CharField()
    reason = serializers.CharField()
    until = serializers.FloatField(allow_null=True, help_text="Unix time the cooldown or open circuit ends.")
    since = serializers.FloatField(help_text="Unix time of the last transition.")


class AccountSerializer(serializers.ModelSerializer[UpstreamAccount]):
    pool: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(slug_field="name", read_only=True)
    credential_set = serializers.SerializerMethodField(help_text="Whether a credential is stored (never its value).")
    health = serializers.SerializerMethodField()

    class Meta:
        model = UpstreamAccount
        fields = [
            "id",
            "pool",
            "name",
            "provider",
            "base_url",
            "models",
            "weight",
            "max_concurrency",
            "priority",
            "enabled",
            "disabled_reason",
            "created_at",
            "credential_set",
            "health",
        ]
        read_only_fields = fields

    def get_credential_set(self, account: UpstreamAccount) -> bool:
        return bool(account.credential_encrypted)

    @extend_schema_field(HealthSerializer)
    def get_health(self, account: UpstreamAccount) -> dict[str, Any]:
        states = self.context.get("health")
        if states is None:
            states = account_health_states([account.pk])
        health = states.get(account.pk)
        if health is None:
            return {"state": "healthy", "reason": "", "until": None, "since": 0.0}
        return {"state": health.state.value, "reason": health.reason, "until": health.until, "since": health.since}


class AccountWriteSerializer(serializers.Serializer[UpstreamAccount]):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True)
    base_url = serializers.CharField(max_length=500, required=False)
    api_key = serializers.CharField(
        required=False, allow_null=True, allow_blank=True, write_only=True, help_text="Write-only; null: none."
    )
    models = serializers.ListField(child=serializers.CharField(max_length=200), required=False, min_length=1)
    weight = serializers.IntegerField(required=False, min_value=1)
    max_concurrency = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    priority = serializers.IntegerField(required=False)
    enabled = serializers.BooleanField(required=False)
    disabled_reason = serializers.CharField(required=False, allow_blank=True, max_length=500)


class AccountCreateSerializer(AccountWriteSerializer):
    pool = serializers.CharField(max_length=64, help_text="The pool's name; created if missing.")
    base_url = serializers.CharField(max_length=500)
    models = serializers.ListField(child=serializers.CharField(max_length=200), min_length=1)


class ProbeAnswerSerializer(serializers.Serializer[object]):
    status = serializers.IntegerField(allow_null=True, help_text="the upstream's HTTP status; null: no answer")
    verdict = serializers.CharField(help_text="success, rate_limited, auth_failure or server_error")
    latency_ms = serializers.FloatField()
    error = serializers.CharField(help_text="empty on success, else http_<status> or no_answer")


class TransitionSerializer(serializers.ModelSerializer[AccountTransition]):
    class Meta:
        model = AccountTransition
        fields = ["id", "from_state", "to_state", "reason", "at", "until"]
        read_only_fields = fields


@extend_schema_view(
    list=extend_schema(
        parameters=[
            OpenApiParameter("pool", str, description="Only this pool's accounts (its name)."),
            OpenApiParameter("enabled", bool, description="Only enabled (true) or disabled (false) accounts."),
        ]
    )
)
class AccountViewSet(OperatorViewSet, mixins.UpdateModelMixin):
    serializer_class = AccountSerializer
    http_method_names = ["get", "post", "patch", "head", "options"]

    def get_queryset(self) -> QuerySet[UpstreamAccount]:
        accounts = UpstreamAccount.objects.select_related("pool")
        if self.action == "list":
            params = self.request.query_params
            if params.get("pool"):
                accounts = accounts.filter(pool__name=params["pool"])
            enabled = params.get("enabled", "").lower()
            if enabled in ("true", "false"):
                accounts = accounts.filter(enabled=enabled == "true")
        return accounts

    @extend_schema(request=AccountCreateSerializer, responses={201: AccountSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = _body(AccountCreateSerializer, request)
        with transaction.atomic():
            account = upstream_account_create(
                pool=pool_get_or_create(name=data.pop("pool")),
                base_url=data.pop("base_url"),
                api_key=data.pop("api_key", None),
                models=data.pop("models"),
                **{k: v for k, v in data.items() if k != "disabled_reason"},
            )
        return Response(AccountSerializer(account).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=AccountWriteSerializer, responses=AccountSerializer)
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        account = self.get_object()
        data = _body(AccountWriteSerializer, request)
        upstream_account_update(
            account=account,
            weight=data.get("weight"),
            max_concurrency=data.get("max_concurrency", UNCHANGED),
            priority=data.get("priority"),
            models=data.get("models"),
            enabled=data.get("enabled"),
            disabled_reason=data.get("disabled_reason", ""),
            name=data.get("name"),
            base_url=data.get("base_url"),
            api_key=data.get("api_key", UNCHANGED),
        )
        return Response(AccountSerializer(account).data)

    @extend_schema(exclude=True)
    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:  # PUT: not offered
        return self.http_method_not_allowed(request)

    def get_serializer_context(self) -> dict[str, Any]:
        context = super().get_serializer_context()
        if self.action == "list":  # one health read for the page, not one per account
            page = getattr(self, "_page_ids", None)
            if page is not None:
                context["health"] = account_health_states(page)
        return context

    def paginate_queryset(self, queryset: QuerySet[UpstreamAccount]) -> list[UpstreamAccount] | None:  # type: ignore[override]
        page = super().paginate_queryset(queryset)
        self._page_ids = [account.pk for account in page or []]
        return page

    @extend_schema(responses=TransitionSerializer(many=True))
    @action(detail=True, methods=["get"], serializer_class=TransitionSerializer)
    def transitions(self, request: Request, pk: str | None = None) -> Response:
        """The account's health transitions, newest first (cursor pagination)."""
        account = self.get_object()
        rows = AccountTransition.objects.filter(account=account)
        page: Any = self.paginate_queryset(rows)  # type: ignore[arg-type]
        return self.get_paginated_response(TransitionSerializer(page, many=True).data)

    @extend_schema(request=None, responses=ProbeAnswerSerializer)
    @action(detail=True, methods=["post"], serializer_class=ProbeAnswerSerializer)
    def test(self, request: Request, pk: str | None = None) -> Response:
        """Probe the account now (the prober's minimal request) and answer what it found (audited)."""
        answer = upstream_account_probe(account=self.get_object())
        return Response(ProbeAnswerSerializer(answer).data)


# --- routes -----------------------------------------------------------------------------------


class RouteTargetSerializer(serializers.Serializer[object]):
    pool = serializers.CharField(max_length=64)
    upstream_model = serializers.CharField(max_length=200)


class RouteSerializer(serializers.ModelSerializer[ModelRoute]):
    targets = serializers.SerializerMethodField()

    class Meta:
        model = ModelRoute
        fields = ["id", "model", "targets", "created_at", "updated_at"]
        read_only_fields = fields

    @extend_schema_field(RouteTargetSerializer(many=True))
    def get_targets(self, route: ModelRoute) -> list[dict[str, str]]:
        targets = sorted(route.targets.all(), key=lambda target: target.position)
        return [{"pool": t.pool.name, "upstream_model": t.upstream_model} for t in targets]


class RouteWriteSerializer(serializers.Serializer[ModelRoute]):
    model = serializers.CharField(max_length=200, help_text="The public model; an existing route of it is replaced.")
    targets = RouteTargetSerializer(many=True, help_text="In failover order: the first is the primary.")


class RouteViewSet(OperatorViewSet, mixins.DestroyModelMixin):
    serializer_class = RouteSerializer
    http_method_names = ["get", "post", "delete", "head", "options"]

    def get_queryset(self) -> QuerySet[ModelRoute]:
        return ModelRoute.objects.prefetch_related("targets__pool")  # a page of routes: three queries

    @extend_schema(request=RouteWriteSerializer, responses={201: RouteSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = _body(RouteWriteSerializer, request)
        targets = [(t["pool"], t["upstream_model"]) for t in data["targets"]]
        route = model_route_set(model=data["model"], targets=targets)
        return Response(RouteSerializer(route).data, status=status.HTTP_201_CREATED)

    @extend_schema(responses={204: None})
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        model_route_delete(model=self.get_object().model)
        return Response(status=status.HTTP_204_NO_CONTENT)
