"""URLs served by Django's own stack (not /v1/* or /readyz): the admin, the management API and
its schema and docs, and /healthz."""

from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.permissions import AllowAny


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", health),
    path("console/", include("tenancy.console.urls")),
    path("api/v1/", include("tenancy.api.urls")),
    path("api/v1/", include("accounts.api.urls")),
    # OpenID Connect sign-in (tenancy.oidc): 404 unless GATEWAY_OIDC_* configure it.
    path("oidc/", include("tenancy.oidc")),
    # The schema and its docs are public: they describe the API, never its data.
    path("api/schema/", SpectacularAPIView.as_view(permission_classes=[AllowAny]), name="schema"),
    path(
        "api/docs/",
        SpectacularSwaggerView.as_view(url_name="schema", permission_classes=[AllowAny]),
        name="api-docs",
    ),
]
