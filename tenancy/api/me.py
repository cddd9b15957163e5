"""``GET /api/v1/me``: who the caller is and the tenants they belong to."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.infra.api import ApiViewMixin
from tenancy.access import is_operator
from tenancy.models import Membership


class MembershipOutSerializer(serializers.Serializer[Membership]):
    tenant_id = serializers.IntegerField()
    tenant = serializers.CharField(source="tenant.slug")
    tenant_name = serializers.CharField(source="tenant.name")
    role = serializers.CharField()


class MeSerializer(serializers.Serializer[object]):
    id = serializers.IntegerField()
    username = serializers.CharField()
    is_operator = serializers.BooleanField()
    memberships = MembershipOutSerializer(many=True)


class MeView(ApiViewMixin, APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(responses=MeSerializer, operation_id="me_retrieve")
    def get(self, request: Request) -> Response:
        user = request.user
        memberships = Membership.objects.filter(user_id=user.pk or 0).select_related("tenant").order_by("tenant__slug")
        data = {
            "id": user.pk,
            "username": user.get_username(),
            "is_operator": is_operator(user),
            "memberships": memberships,
        }
        return Response(MeSerializer(data).data)
