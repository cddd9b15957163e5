"""Tenant pages: the list, creation, limits and budgets, suspension (operators), and members
(owners and admins manage them; only an owner or an operator touches the owner role)."""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from tenancy.access import can_manage, is_operator, require_manage, role_for, tenant_or_404, tenants_for
from tenancy.console.common import confirm, console_view, done, only_post, service_errors, table
from tenancy.console.forms import MemberAddForm, MemberRoleForm, TenantCreateForm, TenantEditForm
from tenancy.models import Membership, Role, Tenant
from tenancy.services.members import member_add, member_remove, member_role_set
from tenancy.services.tenants import tenant_create, tenant_details_set, tenant_update


def _operator_only(request: HttpRequest) -> None:
    if not is_operator(request.user):
        raise PermissionDenied("Only platform operators create tenants or change their limits.")


@console_view
def tenant_list(request: HttpRequest) -> HttpResponse:
    rows = tenants_for(request.user).annotate(
        key_count=Count("api_keys", filter=Q(api_keys__revoked_at__isnull=True), distinct=True),
        member_count=Count("memberships", distinct=True),
    )
    query = request.GET.get("q", "").strip()
    if query:
        rows = rows.filter(Q(slug__icontains=query) | Q(name__icontains=query))
    tenants = table(
        request,
        rows,
        [
            ("Name", "name", "name"),
            ("Slug", "slug", "slug"),
            ("Status", "status", "is_active"),
            ("Active keys", "keys", "key_count"),
            ("Members", "members", "member_count"),
            ("Created", "created", "created_at"),
        ],
        default="name",
        numeric=("keys", "members"),
    )
    return render(request, "console/tenants.html", {"table": tenants, "query": query})


@console_view
def tenant_new(request: HttpRequest) -> HttpResponse:
    _operator_only(request)
    form = TenantCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            tenant = tenant_create(slug=form.cleaned_data["slug"], name=form.cleaned_data["name"], **form.limits())
        except ValidationError as error:
            service_errors(form, error, {"slug": "slug"})
        else:
            return done(request, f"Tenant {tenant.slug} created.", "console:tenant", tenant.slug)
    return render(request, "console/form.html", {"title": "New tenant", "form": form, "submit": "Create tenant"})


@console_view
def tenant_detail(request: HttpRequest, slug: str) -> HttpResponse:
    """One tenant's page: 404 outside the caller's tenants; write buttons only for managers."""
    tenant = tenant_or_404(request.user, slug)
    role = role_for(request.user, tenant)
    members = tenant.memberships.select_related("user").order_by("user__username")
    return render(
        request,
        "console/tenant.html",
        {
            "tenant": tenant,
            "can_manage": can_manage(request.user, tenant),
            "is_owner": role == Role.OWNER,
            "operator": is_operator(request.user),
            "members": members,
            "add_form": MemberAddForm(),
            "roles": Role.choices,
            "key_count": tenant.api_keys.filter(revoked_at__isnull=True).count(),
        },
    )


@console_view
def tenant_edit(request: HttpRequest, slug: str) -> HttpResponse:
    tenant = tenant_or_404(request.user, slug)
    _operator_only(request)
    initial = {"name": tenant.name, **TenantEditForm.initial_of(tenant)}
    form = TenantEditForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        try:
            with transaction.atomic():
                tenant_details_set(tenant=tenant, name=form.cleaned_data["name"])
                tenant_update(tenant=tenant, **form.limits())
        except ValidationError as error:
            tenant.refresh_from_db()
            service_errors(
                form,
                error,
                {
                    "budget_window": "budget_window_start",
                    "budget window": "budget_window_start",
                    "budget_usd": "budget_usd",
                },
            )
        else:
            return done(request, "Limits and budget saved.", "console:tenant", tenant.slug)
    context = {"title": f"Limits and budget of {tenant.name}", "form": form, "submit": "Save", "tenant": tenant}
    return render(request, "console/form.html", context)


@console_view
def tenant_suspend(request: HttpRequest, slug: str) -> HttpResponse:
    tenant = tenant_or_404(request.user, slug)
    _operator_only(request)
    if request.method == "POST":
        tenant_details_set(tenant=tenant, is_active=False)
        return done(request, f"Tenant {tenant.slug} suspended: every key is refused.", "console:tenant", tenant.slug)
    return confirm(
        request,
        title=f"Suspend {tenant.name}?",
        message="Every API key of this tenant is refused from the next request on, on every gateway, "
        "until the tenant is resumed. Nothing is deleted.",
        button="Suspend tenant",
        cancel_url=f"/console/tenants/{tenant.slug}/",
    )


@console_view
def tenant_resume(request: HttpRequest, slug: str) -> HttpResponse:
    tenant = tenant_or_404(request.user, slug)
    if (refused := only_post(request)) is not None:
        return refused
    _operator_only(request)
    tenant_details_set(tenant=tenant, is_active=True)
    return done(request, f"Tenant {tenant.slug} resumed.", "console:tenant", tenant.slug)


def _check_owner_rights(request: HttpRequest, tenant: Tenant, *roles: str) -> None:
    """Manage the tenant; and touch the owner role only as an owner (or an operator)."""
    require_manage(request.user, tenant)
    if Role.OWNER in roles and role_for(request.user, tenant) != Role.OWNER:
        raise PermissionDenied("Only an owner grants, changes or removes the owner role.")


@console_view
def member_new(request: HttpRequest, slug: str) -> HttpResponse:
    tenant = tenant_or_404(request.user, slug)
    if (refused := only_post(request)) is not None:
        return refused
    require_manage(request.user, tenant)
    form = MemberAddForm(request.POST)
    if form.is_valid():
        _check_owner_rights(request, tenant, form.cleaned_data["role"])
        try:
            membership = member_add(
                tenant=tenant,
                username=form.cleaned_data["username"],
                role=form.cleaned_data["role"],
                password=form.cleaned_data["password"] or None,
            )
        except ValidationError as error:
            service_errors(form, error, {"username": "username", "owner": "role"})
        else:
            name = membership.user.get_username()
            return done(request, f"{name} is now {membership.role} of {tenant.slug}.", "console:tenant", tenant.slug)
    members = tenant.memberships.select_related("user").order_by("user__username")
    context = {"tenant": tenant, "can_manage": True, "members": members, "add_form": form, "roles": Role.choices}
    context.update(is_owner=role_for(request.user, tenant) == Role.OWNER, operator=is_operator(request.user))
    return render(request, "console/tenant.html", context, status=400)


def _membership(request: HttpRequest, slug: str, member_id: int) -> Membership:
    tenant = tenant_or_404(request.user, slug)
    return get_object_or_404(Membership.objects.select_related("user", "tenant"), tenant=tenant, pk=member_id)


@console_view
def member_role(request: HttpRequest, slug: str, member_id: int) -> HttpResponse:
    membership = _membership(request, slug, member_id)
    if (refused := only_post(request)) is not None:
        return refused
    form = MemberRoleForm(request.POST)
    if not form.is_valid():
        require_manage(request.user, membership.tenant)
        return done(request, "Choose a role.", "console:tenant", slug)
    _check_owner_rights(request, membership.tenant, membership.role, form.cleaned_data["role"])
    try:
        member_role_set(membership=membership, role=form.cleaned_data["role"])
    except ValidationError as error:
        messages.error(request, " ".join(error.messages))
        return redirect("console:tenant", slug)
    return done(request, f"{membership.user.get_username()} is now {membership.role}.", "console:tenant", slug)


@console_view
def member_delete(request: HttpRequest, slug: str, member_id: int) -> HttpResponse:
    membership = _membership(request, slug, member_id)
    _check_owner_rights(request, membership.tenant, membership.role)
    name = membership.user.get_username()
    if request.method == "POST":
        try:
            member_remove(membership=membership)
        except ValidationError as error:
            messages.error(request, " ".join(error.messages))
            return redirect("console:tenant", slug)
        return done(request, f"{name} removed from {slug}.", "console:tenant", slug)
    return confirm(
        request,
        title=f"Remove {name} from {membership.tenant.name}?",
        message=f"{name} loses access to this tenant at once. Their user account stays.",
        button="Remove member",
        cancel_url=f"/console/tenants/{slug}/",
    )
