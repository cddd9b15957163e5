"""The supply side's routes under /api/v1/ (mounted by gateway.conf.urls): operators only."""

from __future__ import annotations

from rest_framework.routers import SimpleRouter

from accounts.api.upstreams import AccountViewSet, PoolViewSet, RouteViewSet

router = SimpleRouter()
router.register("pools", PoolViewSet, basename="pool")
router.register("accounts", AccountViewSet, basename="account")
router.register("routes", RouteViewSet, basename="route")

urlpatterns = router.urls
