"""``/api/v1/members/``: who belongs to the caller's tenants, with which role.

Owners and admins add members (creating the user if needed, with no password: they sign in
with single sign-on or use tokens), change roles and remove them; only an owner (or an
operator) grants, changes or removes the ``owner`` role; a tenant keeps its last owner.
Viewers read; outsiders get 404.
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import serializers, status
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response

from tenancy.access import require_manage, role_for, tenant_or_404
from tenancy.api.base import TENANT_FILTER, ManagedViewSet, validated
from tenancy.models import Membership, Role, Tenant
from tenancy.services.members import member_add, member_remove, member_role_set


class MemberSerializer(serializers.ModelSerializer[Membership]):
    tenant: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    username = serializers.CharField(source="user.username", read_only=True)

    class Meta:
        model = Membership
        fields = ["id", "tenant", "username", "role", "created_at"]
        read_only_fields = fields


class MemberCreateSerializer(serializers.Serializer[Membership]):
    tenant = serializers.CharField(help_text="The tenant's slug or id.")
    username = serializers.CharField(max_length=150)
    role = serializers.ChoiceField(choices=Role.choices)


class MemberRoleSerializer(serializers.Serializer[Membership]):
    role = serializers.ChoiceField(choices=Role.choices)


def _check_owner_rights(user: Any, tenant: Tenant, *roles: str) -> None:
    """Manage the tenant; and touch the owner role only as an owner (or an operator)."""
    require_manage(user, tenant)
    if Role.OWNER in roles and role_for(user, tenant) != Role.OWNER:
        raise PermissionDenied("Only an owner grants, changes or removes the owner role.")


@extend_schema_view(list=extend_schema(parameters=[TENANT_FILTER]))
class MemberViewSet(ManagedViewSet):
    serializer_class = MemberSerializer

    def get_queryset(self) -> QuerySet[Membership]:
        return self.scoped(Membership.objects.select_related("tenant", "user"))

    @extend_schema(request=MemberCreateSerializer, responses={201: MemberSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = validated(MemberCreateSerializer, request)
        tenant = tenant_or_404(request.user, data["tenant"])
        _check_owner_rights(request.user, tenant, data["role"])
        membership = member_add(tenant=tenant, username=data["username"], role=data["role"])
        return Response(MemberSerializer(membership).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=MemberRoleSerializer, responses=MemberSerializer)
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        membership = self.get_object()
        body = MemberRoleSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        _check_owner_rights(request.user, membership.tenant, membership.role, body.validated_data["role"])
        member_role_set(membership=membership, role=body.validated_data["role"])
        return Response(MemberSerializer(membership).data)

    @extend_schema(responses={204: None})
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        membership = self.get_object()
        _check_owner_rights(request.user, membership.tenant, membership.role)
        member_remove(membership=membership)
        return Response(status=status.HTTP_204_NO_CONTENT)
