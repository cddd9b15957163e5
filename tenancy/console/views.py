"""Console views: thin, server-rendered; every write goes through a service."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from tenancy.access import can_manage, is_operator, tenant_or_404, tenants_for


def oidc_enabled() -> bool:
    """SSO is offered only when OpenID Connect is configured (the setting may be absent)."""
    return bool(getattr(settings, "GATEWAY_OIDC_ISSUER", ""))


class ConsoleLoginView(auth_views.LoginView):
    template_name = "console/login.html"
    redirect_authenticated_user = True
    next_page = "console:home"

    def get_context_data(self, **kwargs: object) -> dict[str, object]:
        context = super().get_context_data(**kwargs)
        context["oidc_enabled"] = oidc_enabled()
        return context


class ConsoleLogoutView(auth_views.LogoutView):
    """Sign-out by POST only (Django's LogoutView refuses GET)."""

    next_page = "console:login"


@login_required(login_url="console:login")
def home(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "console/home.html",
        {"operator": is_operator(request.user), "tenants": tenants_for(request.user)},
    )


@login_required(login_url="console:login")
def tenant_detail(request: HttpRequest, slug: str) -> HttpResponse:
    """One tenant's page: 404 outside the caller's tenants; write buttons only for managers."""
    tenant = tenant_or_404(request.user, slug)
    return render(
        request,
        "console/tenant.html",
        {
            "tenant": tenant,
            "can_manage": can_manage(request.user, tenant),
            "members": tenant.memberships.select_related("user"),
        },
    )
