"""The demand side's routes under /api/v1/ (mounted by gateway.conf.urls)."""

from __future__ import annotations

from django.urls import path
from rest_framework.routers import SimpleRouter

from tenancy.api.keys import ApiKeyViewSet
from tenancy.api.logs import AuditViewSet, UsageRecordViewSet
from tenancy.api.me import MeView
from tenancy.api.members import MemberViewSet
from tenancy.api.prices import PriceViewSet
from tenancy.api.reports import ReconciliationView, StatementViewSet, UsageReportView
from tenancy.api.tenants import TenantViewSet
from tenancy.api.tokens import TokenViewSet

router = SimpleRouter()
router.register("tokens", TokenViewSet, basename="token")
router.register("tenants", TenantViewSet, basename="tenant")
router.register("keys", ApiKeyViewSet, basename="apikey")
router.register("members", MemberViewSet, basename="member")
router.register("prices", PriceViewSet, basename="price")
router.register("audit", AuditViewSet, basename="audit")
router.register("usage/records", UsageRecordViewSet, basename="usage-record")
router.register("statements", StatementViewSet, basename="statement")

urlpatterns = [
    path("me", MeView.as_view(), name="me"),
    path("reports/usage", UsageReportView.as_view(), name="report-usage"),
    path("reports/reconciliation", ReconciliationView.as_view(), name="report-reconciliation"),
    *router.urls,
]
