"""``/api/v1/prices/``: model prices and their versions (operators only; others 403).

Prices are demand-side rows (``tenancy.models.PriceVersion``) that operators manage, so the
endpoints live in ``tenancy`` (which may import ``accounts``, never the reverse). A version is
never edited: ``POST`` adds one with its ``effective_from`` (default now), through the same
service as ``manage.py price_set``; ``GET ?model=`` reads a model's history, newest first.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from accounts.infra.api import ApiViewMixin, IdCursorPagination, IsOperator
from tenancy.models import PRICE_MAX_DIGITS, PRICE_PLACES, PriceVersion
from tenancy.pricing import Price
from tenancy.services.prices import price_set
from tenancy.services.rollups import rerate_preview


class PriceSerializer(serializers.ModelSerializer[PriceVersion]):
    class Meta:
        model = PriceVersion
        fields = [
            "id",
            "model",
            "input",
            "cached_input",
            "cache_write",
            "output",
            "reasoning",
            "effective_from",
            "created_at",
        ]
        read_only_fields = fields


def _money(**kwargs: Any) -> serializers.DecimalField:
    return serializers.DecimalField(max_digits=PRICE_MAX_DIGITS, decimal_places=PRICE_PLACES, min_value=0, **kwargs)


class PriceCreateSerializer(serializers.Serializer[PriceVersion]):
    model = serializers.CharField(max_length=200)
    input = _money(help_text="USD per million input tokens")
    cached_input = _money()
    cache_write = _money()
    output = _money()
    reasoning = _money(required=False, allow_null=True, help_text="null: reasoning tokens cost the output price")
    effective_from = serializers.DateTimeField(required=False, help_text="default: now")


@extend_schema_view(list=extend_schema(parameters=[OpenApiParameter("model", str, description="one model's history")]))
class PriceViewSet(ApiViewMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    permission_classes = [IsOperator]
    pagination_class = IdCursorPagination
    serializer_class = PriceSerializer
    http_method_names = ["get", "post", "head", "options"]

    def get_queryset(self) -> QuerySet[PriceVersion]:
        prices = PriceVersion.objects.all()
        model = self.request.query_params.get("model")
        if self.action == "list" and model:
            prices = prices.filter(model=model)
        return prices

    @extend_schema(request=PriceCreateSerializer, responses={201: PriceSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        body = PriceCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        with transaction.atomic():
            price = price_set(**body.validated_data)
        return Response(PriceSerializer(price).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        request=PriceCreateSerializer,
        responses={200: OpenApiResponse(description="Per tenant: current and new cost of the affected period.")},
    )
    @action(detail=False, methods=["post"])
    def preview(self, request: Request) -> Response:
        """Dry run of adding this price version: what re-rating would change, per tenant. Saves nothing."""
        body = PriceCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        candidate = Price(
            id=0,
            model=data["model"].strip(),
            input=data["input"],
            cached_input=data["cached_input"],
            cache_write=data["cache_write"],
            output=data["output"],
            reasoning=data.get("reasoning"),
            effective_from=data.get("effective_from") or timezone.now(),
        )
        return Response(rerate_preview(candidate))
