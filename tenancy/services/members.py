"""Writes of tenant membership: add a person (creating the user if needed), change a role, remove.

Roles (tenancy.models.Role): owners and admins manage the tenant, viewers read. A tenant keeps
at least one owner once it has one: the last owner can be neither removed nor demoted.
"""

from __future__ import annotations

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import transaction

from accounts.infra.audit import audit_change, audit_snapshot
from tenancy.models import Membership, Role, Tenant

_FIELDS = ("user", "tenant", "role")


def _role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise ValidationError(f"role must be one of {', '.join(Role.values)}, not {value!r}.", code="invalid") from None


def _audit(action: str, membership: Membership, before: dict[str, object] | None, *, gone: bool = False) -> None:
    audit_change(
        action,
        target=membership,
        before=before,
        after=None if gone else audit_snapshot(membership, _FIELDS),
        tenant_id=membership.tenant_id,
        label=f"{membership.user.get_username()} in {membership.tenant.slug}",
    )


def user_get_or_create(*, username: str, password: str | None = None) -> tuple[User, bool]:
    """The user called ``username``, created if absent (with ``password``, else an unusable
    one: such a user signs in only through single sign-on or uses tokens). Returns
    ``(user, created)``; an existing user's password is never changed here."""
    username = username.strip()
    if not username or len(username) > 150:
        raise ValidationError("a username is 1 to 150 characters.", code="invalid")
    user = User.objects.filter(username=username).first()
    if user is not None:
        return user, False
    user = User(username=username)
    user.full_clean(exclude=["password"])
    if password:
        user.set_password(password)
    else:
        user.set_unusable_password()
    user.save()
    return user, True


def member_add(*, tenant: Tenant, username: str, role: str, password: str | None = None) -> Membership:
    """Give ``username`` the ``role`` in ``tenant`` (creating the user if needed, see
    :func:`user_get_or_create`). An existing member's role is changed instead."""
    new_role = _role(role)
    with transaction.atomic():
        user, _ = user_get_or_create(username=username, password=password)
        membership = Membership.objects.select_for_update().filter(user=user, tenant=tenant).first()
        if membership is not None:
            return member_role_set(membership=membership, role=new_role)
        membership = Membership.objects.create(user=user, tenant=tenant, role=new_role)
        _audit("member.add", membership, None)
    return membership


def _refuse_losing_last_owner(membership: Membership, what: str) -> None:
    if membership.role != Role.OWNER:
        return
    owners = Membership.objects.select_for_update().filter(tenant_id=membership.tenant_id, role=Role.OWNER)
    if owners.count() <= 1:
        raise ValidationError(f"cannot {what} the last owner of the tenant: make someone else owner first.")


def member_role_set(*, membership: Membership, role: str) -> Membership:
    """Change a member's role (refused if it would leave the tenant without an owner)."""
    new_role = _role(role)
    with transaction.atomic():
        before = audit_snapshot(membership, _FIELDS)
        if new_role != Role.OWNER:
            _refuse_losing_last_owner(membership, "demote")
        membership.role = new_role
        membership.save(update_fields=["role"])
        _audit("member.update", membership, before)
    return membership


def member_remove(*, membership: Membership) -> None:
    """Remove a member from its tenant (refused for the last owner). The user stays."""
    with transaction.atomic():
        _refuse_losing_last_owner(membership, "remove")
        _audit("member.remove", membership, audit_snapshot(membership, _FIELDS), gone=True)
        membership.delete()
