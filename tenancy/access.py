"""Who may see and change which tenant: the one place the management API and the console ask.

Operators (active ``is_staff`` users) see and change everything. Everyone else sees the
tenants they are members of; owners and admins manage them, viewers only read. A tenant
the user cannot see does not exist for them (404, never 403, which would confirm it exists);
a write on a tenant they can see but not manage is refused (403).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import Http404

from tenancy.models import Membership, Role, Tenant

MANAGING_ROLES = frozenset({Role.OWNER, Role.ADMIN})


def is_operator(user: Any) -> bool:
    """A platform operator: an active staff user."""
    return bool(getattr(user, "is_authenticated", False) and user.is_active and user.is_staff)


def tenants_for(user: Any) -> QuerySet[Tenant]:
    """The tenants ``user`` may see: all for an operator, else those they are a member of."""
    if is_operator(user):
        return Tenant.objects.all()
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return Tenant.objects.none()
    return Tenant.objects.filter(memberships__user=user)


def tenant_ids_for(user: Any) -> QuerySet[Tenant] | None:
    """For filtering other tables by tenant: None for an operator (no filter), else the ids."""
    if is_operator(user):
        return None
    return tenants_for(user).values_list("id", flat=True)  # type: ignore[return-value]


def role_for(user: Any, tenant: Tenant) -> Role | None:
    """``user``'s role in ``tenant`` (None: not a member). Operators are treated as owners."""
    if is_operator(user):
        return Role.OWNER
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return None
    role = Membership.objects.filter(user=user, tenant=tenant).values_list("role", flat=True).first()
    return Role(role) if role else None


def can_manage(user: Any, tenant: Tenant) -> bool:
    """Operators, and the tenant's owners and admins."""
    return role_for(user, tenant) in MANAGING_ROLES


def tenant_or_404(user: Any, ident: str | int) -> Tenant:
    """The tenant with id or slug ``ident`` if ``user`` may see it; else Http404."""
    tenants = tenants_for(user)
    text = str(ident)
    if "\x00" in text or len(text) > 100:  # no such slug; PostgreSQL cannot compare a NUL
        raise Http404("No such tenant.")
    if text.isascii() and text.isdigit():
        tenant = tenants.filter(pk=int(text)).first() if len(text) <= 18 else None
    else:
        tenant = tenants.filter(slug=text).first()
    if tenant is None:
        raise Http404("No such tenant.")
    return tenant


def require_manage(user: Any, tenant: Tenant) -> None:
    """Refuse (PermissionDenied, a 403) unless ``user`` may manage ``tenant``."""
    if not can_manage(user, tenant):
        raise PermissionDenied("Your role in this tenant only reads.")
