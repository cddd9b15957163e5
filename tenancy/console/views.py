"""Console views: sign-in (password, then a TOTP code for users who enrolled one), sign-out and
the overview. Thin and server-rendered; every write goes through a service."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from accounts.models import UpstreamAccount
from tenancy.access import is_operator, tenant_ids_for, tenant_or_404, tenants_for
from tenancy.console.common import console_view, has_confirmed_device
from tenancy.console.otp import start_pending
from tenancy.console.upstreams import with_health
from tenancy.overview import usage_overview

# The overview's time ranges: label, length, chart bucket.
RANGES = {
    "1h": ("Last hour", timedelta(hours=1), "minute"),
    "24h": ("Last 24 hours", timedelta(hours=24), "hour"),
    "7d": ("Last 7 days", timedelta(days=7), "hour"),
    "30d": ("Last 30 days", timedelta(days=30), "day"),
}
DEFAULT_RANGE = "24h"


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
        context["hide_nav"] = True
        return context

    def form_valid(self, form: Any) -> HttpResponse:
        """The right password: signed in, unless the user enrolled a TOTP device (then the code)."""
        user = form.get_user()
        if has_confirmed_device(user):
            return start_pending(self.request, user, self.get_redirect_url())
        return super().form_valid(form)


class ConsoleLogoutView(auth_views.LogoutView):
    """Sign-out by POST only (Django's LogoutView refuses GET)."""

    next_page = "console:login"


@console_view
def home(request: HttpRequest) -> HttpResponse:
    """The overview: requests, tokens, cost, errors and latency over a time range; the top keys
    and models; the upstreams' health (operators)."""
    user = request.user
    range_key = request.GET.get("range", DEFAULT_RANGE)
    if range_key not in RANGES:
        range_key = DEFAULT_RANGE
    label, length, bucket = RANGES[range_key]
    tenants = tenants_for(user).order_by("name")
    tenant = None
    tenant_ids: Any = tenant_ids_for(user)
    if request.GET.get("tenant"):
        tenant = tenant_or_404(user, request.GET["tenant"])
        tenant_ids = [tenant.pk]
    elif tenant_ids is not None:
        tenant_ids = list(tenant_ids)
    end = timezone.now()
    overview = usage_overview(tenant_ids=tenant_ids, start=end - length, end=end, bucket=bucket)
    series = overview["series"]
    chart = {
        "t": [row["t"] for row in series],
        **{name: [row[name] for row in series] for name in ("requests", "errors", "tokens", "cost")},
    }
    health: dict[str, Any] = {}
    if is_operator(user):
        accounts = with_health(UpstreamAccount.objects.select_related("pool").order_by("pool__name", "id"))
        health = {
            "counts": sorted(Counter(a.health["state"] for a in accounts).items()),  # type: ignore[attr-defined]
            "unhealthy": [a for a in accounts if a.health["state"] != "healthy"],  # type: ignore[attr-defined]
            "total": len(accounts),
        }
    context = {
        "operator": is_operator(user),
        "tenants": tenants,
        "tenant": tenant,
        "ranges": [(key, value[0]) for key, value in RANGES.items()],
        "range_key": range_key,
        "range_label": label,
        "overview": overview,
        "chart": chart,
        "health": health,
    }
    return render(request, "console/home.html", context)
