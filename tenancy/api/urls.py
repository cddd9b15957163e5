"""The demand side's routes under /api/v1/ (mounted by gateway.conf.urls)."""

from __future__ import annotations

from django.urls import path
from rest_framework.routers import SimpleRouter

from tenancy.api.me import MeView
from tenancy.api.tokens import TokenViewSet

router = SimpleRouter()
router.register("tokens", TokenViewSet, basename="token")

urlpatterns = [path("me", MeView.as_view(), name="me"), *router.urls]
