"""The supply side's routes under /api/v1/ (mounted by gateway.conf.urls)."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver

urlpatterns: list[URLPattern | URLResolver] = []
