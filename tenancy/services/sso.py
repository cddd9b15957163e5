"""Writes made when a person signs in by single sign-on (OpenID Connect, tenancy.oidc).

The identity provider is the truth for the people who sign in through it: their tenant
memberships become exactly the ones its claim lists, and, when an operator claim is configured,
whether they are an operator. Each change goes through the membership services (audited; the
last owner of a tenant is never removed or demoted, the entry stays until someone else owns it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import transaction

from accounts.infra.audit import audit_change, audit_snapshot
from tenancy.models import Membership, Role, Tenant
from tenancy.services.members import member_add, member_remove, member_role_set, user_get_or_create

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SsoSync:
    """What a sign-in changed (for logs and tests)."""

    user: User
    created: bool
    memberships: dict[str, str]  # tenant slug -> role, after the sync
    ignored: list[str]  # claim entries that name no tenant or no role


def tenant_roles_parse(entries: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """``["acme:admin", "beta:viewer"]`` -> ``({"acme": "admin", "beta": "viewer"}, [])``; entries
    that are not ``slug:role`` with a known role come back in the second list. When a tenant is
    listed twice the strongest role wins (owner > admin > viewer)."""
    strength = {Role.VIEWER: 0, Role.ADMIN: 1, Role.OWNER: 2}
    roles: dict[str, str] = {}
    ignored: list[str] = []
    for entry in entries:
        slug, sep, role = str(entry).strip().rpartition(":")
        if not sep or not slug or role not in Role.values:
            ignored.append(str(entry))
            continue
        if slug not in roles or strength[Role(role)] > strength[Role(roles[slug])]:
            roles[slug] = role
    return roles, ignored


def sso_user_sync(
    *, username: str, email: str = "", tenant_entries: Iterable[str], is_operator: bool | None
) -> SsoSync:
    """Create or update the person called ``username`` from their identity provider's claims:
    memberships become exactly ``tenant_entries`` (``slug:role``; tenants that do not exist are
    ignored), and ``is_staff`` becomes ``is_operator`` unless that is None (no operator claim)."""
    wanted, ignored = tenant_roles_parse(tenant_entries)
    with transaction.atomic():
        user, created = user_get_or_create(username=username)
        _user_fields_sync(user, email=email, is_operator=is_operator)
        tenants = {t.slug: t for t in Tenant.objects.filter(slug__in=wanted)}
        ignored += [f"{slug}:{wanted[slug]}" for slug in wanted if slug not in tenants]
        current = {m.tenant.slug: m for m in Membership.objects.filter(user=user).select_related("tenant", "user")}
        for slug, tenant in tenants.items():
            membership = current.get(slug)
            if membership is None:
                member_add(tenant=tenant, username=user.username, role=wanted[slug])
            elif membership.role != wanted[slug]:
                _keep_last_owner(member_role_set, membership=membership, role=wanted[slug])
        for slug, membership in current.items():
            if slug not in tenants:
                _keep_last_owner(member_remove, membership=membership)
        after = {m.tenant.slug: m.role for m in Membership.objects.filter(user=user).select_related("tenant")}
    if ignored:
        log.warning("single sign-on of %s: ignored tenant claim entries %s", username, ignored)
    return SsoSync(user=user, created=created, memberships=after, ignored=ignored)


def _keep_last_owner(write: Callable[..., object], **kwargs: object) -> None:
    """Run a membership write; one refused because it would leave a tenant ownerless is skipped."""
    try:
        with transaction.atomic():
            write(**kwargs)
    except ValidationError as exc:
        log.warning("single sign-on kept a membership: %s", " ".join(exc.messages))


def _user_fields_sync(user: User, *, email: str, is_operator: bool | None) -> None:
    before = audit_snapshot(user, ("email", "is_staff"))
    changed = []
    if email and user.email != email:
        user.email = email
        changed.append("email")
    if is_operator is not None and user.is_staff != is_operator:
        user.is_staff = is_operator
        changed.append("is_staff")
    if changed:
        user.save(update_fields=changed)
        audit_change(
            "user.sso_update",
            target=user,
            before=before,
            after=audit_snapshot(user, ("email", "is_staff")),
            label=user.get_username(),
        )


def claim_values(claims: Mapping[str, object], name: str) -> list[str]:
    """A claim as a list of strings: a list as is, a string split on commas and spaces."""
    value = claims.get(name)
    if isinstance(value, str):
        return [part for part in value.replace(",", " ").split() if part]
    if isinstance(value, list | tuple):
        return [str(item) for item in value]
    return []
