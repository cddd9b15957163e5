"""API key pages of one tenant: the list, create (the secret shown once), details, limits and
policy, rotate with a grace period, revoke. Owners and admins write; viewers read."""

from __future__ import annotations

from datetime import timedelta

from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.utils import timezone

from tenancy.access import can_manage, require_manage, tenant_or_404
from tenancy.console.common import confirm, console_view, done, service_errors, table
from tenancy.console.forms import KeyForm, RotateForm, names
from tenancy.models import ApiKey, Tenant
from tenancy.selectors import usage_summary
from tenancy.services.keys import apikey_create, apikey_details_set, apikey_revoke, apikey_rotate, apikey_update

# A service's field names that the key form shows under another field.
_FIELDS = {
    "budget_window": "budget_window_start",
    "budget window": "budget_window_start",
    "allowed models": "allowed_models",
    "expires_at": "expires_at",
}


def _key(request: HttpRequest, slug: str, key_id: int) -> tuple[Tenant, ApiKey]:
    tenant = tenant_or_404(request.user, slug)
    return tenant, get_object_or_404(ApiKey, tenant=tenant, pk=key_id)


@console_view
def key_list(request: HttpRequest, slug: str) -> HttpResponse:
    tenant = tenant_or_404(request.user, slug)
    rows = ApiKey.objects.filter(tenant=tenant)
    state = request.GET.get("state", "active")
    if state == "active":
        rows = rows.filter(revoked_at__isnull=True)
    elif state == "revoked":
        rows = rows.filter(revoked_at__isnull=False)
    keys = table(
        request,
        rows,
        [
            ("Name", "name", "name"),
            ("Prefix", "prefix", "prefix"),
            ("Status", "", ""),
            ("Allowed models", "", ""),
            ("Last used", "used", "last_used_at"),
            ("Expires", "expires", "expires_at"),
            ("Created", "created", "created_at"),
        ],
        default="-created",
    )
    context = {"tenant": tenant, "table": keys, "state": state, "can_manage": can_manage(request.user, tenant)}
    context["now"] = timezone.now()
    return render(request, "console/keys.html", context)


@console_view
def key_new(request: HttpRequest, slug: str) -> HttpResponse:
    tenant = tenant_or_404(request.user, slug)
    require_manage(request.user, tenant)
    form = KeyForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            api_key, secret = apikey_create(
                tenant=tenant,
                name=data["name"],
                allowed_models=names(data["allowed_models"]),
                expires_at=data["expires_at"],
                **form.limits(),
                **form.policy(),
            )
        except ValidationError as error:
            service_errors(form, error, _FIELDS)
        else:
            # Rendered, not redirected: the secret is in this one answer only (no-store).
            context = {"tenant": tenant, "api_key": api_key, "secret": secret, "what": "created"}
            return render(request, "console/key_secret.html", context)
    context = {"title": f"New API key for {tenant.name}", "form": form, "submit": "Create key", "tenant": tenant}
    return render(request, "console/form.html", context)


@console_view
def key_detail(request: HttpRequest, slug: str, key_id: int) -> HttpResponse:
    tenant, api_key = _key(request, slug, key_id)
    manage = can_manage(request.user, tenant) and api_key.revoked_at is None
    form = KeyForm(request.POST or None, initial=KeyForm.initial_of(api_key)) if manage else None
    status = 200
    if request.method == "POST":
        require_manage(request.user, tenant)
        assert form is not None
        if form.is_valid():
            data = form.cleaned_data
            try:
                with transaction.atomic():
                    apikey_details_set(
                        api_key=api_key,
                        name=data["name"],
                        allowed_models=names(data["allowed_models"]),
                        expires_at=data["expires_at"],
                    )
                    apikey_update(api_key=api_key, **form.limits(), **form.policy())
            except ValidationError as error:
                api_key.refresh_from_db()
                service_errors(form, error, _FIELDS)
            else:
                return done(request, "Key saved.", "console:key", tenant.slug, api_key.pk)
        status = 400
    context = {
        "tenant": tenant,
        "api_key": api_key,
        "form": form,
        "can_manage": manage,
        "usage": usage_summary(api_key, since=timezone.now() - timedelta(days=30)),
        "now": timezone.now(),
    }
    return render(request, "console/key.html", context, status=status)


@console_view
def key_rotate(request: HttpRequest, slug: str, key_id: int) -> HttpResponse:
    tenant, api_key = _key(request, slug, key_id)
    require_manage(request.user, tenant)
    form = RotateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            api_key, secret = apikey_rotate(api_key=api_key, grace_seconds=form.cleaned_data["grace_seconds"])
        except ValidationError as error:
            service_errors(form, error)
        else:
            context = {"tenant": tenant, "api_key": api_key, "secret": secret, "what": "rotated"}
            return render(request, "console/key_secret.html", context)
    return confirm(
        request,
        title=f"Rotate key {api_key.name or api_key.prefix}?",
        message="The key gets a new secret, shown once. It keeps its limits, policy and usage; the old "
        "secret keeps working for the grace period below, then is refused.",
        button="Rotate key",
        cancel_url=f"/console/tenants/{tenant.slug}/keys/{api_key.pk}/",
        form=form,
    )


@console_view
def key_revoke(request: HttpRequest, slug: str, key_id: int) -> HttpResponse:
    tenant, api_key = _key(request, slug, key_id)
    require_manage(request.user, tenant)
    if request.method == "POST":
        apikey_revoke(api_key=api_key)
        return done(request, f"Key {api_key.prefix} revoked.", "console:key", tenant.slug, api_key.pk)
    return confirm(
        request,
        title=f"Revoke key {api_key.name or api_key.prefix}?",
        message="Every request with this key is refused from the next one on, on every gateway. "
        "This cannot be undone: create a new key instead.",
        button="Revoke key",
        cancel_url=f"/console/tenants/{tenant.slug}/keys/{api_key.pk}/",
    )
