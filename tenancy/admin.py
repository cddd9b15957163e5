"""Admin for tenants, keys and usage. Keys are created by `manage.py apikey_create`
(the secret is shown once there); the admin shows prefixes and can revoke."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from accounts.admin import AppendOnlyAdmin, ReadOnlyAdmin
from tenancy.models import ApiKey, BudgetAlert, PriceVersion, Tenant, UsageRecord
from tenancy.services.keys import apikey_revoke


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "is_active", "created_at")
    list_filter = ("is_active",)
    search_fields = ("slug", "name")
    readonly_fields = ("created_at",)


@admin.action(description="Revoke selected API keys")
def revoke_keys(modeladmin: admin.ModelAdmin[ApiKey], request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
    count = 0
    for api_key in queryset.filter(revoked_at__isnull=True):
        apikey_revoke(api_key=api_key)
        count += 1
    modeladmin.message_user(request, f"Revoked {count} API key(s).", messages.SUCCESS)


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "tenant", "name", "expires_at", "revoked_at", "last_used_at", "created_at")
    list_filter = ("tenant",)
    list_select_related = ("tenant",)
    search_fields = ("prefix", "name", "tenant__slug")
    # The digest is only useful to the gateway; never editable (it would break the key).
    readonly_fields = (
        "tenant",
        "prefix",
        "digest",
        "last_used_at",
        "created_at",
        "previous_prefix",
        "previous_valid_until",
        "rotated_at",
    )
    # Rotation's secrets and bookkeeping: not shown (the previous digest, the replayable answer).
    exclude = ("previous_digest", "rotation_idempotency_key", "rotation_grace_seconds", "rotation_secret_encrypted")
    actions = (revoke_keys,)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A key made here could never be shown to anyone: use `manage.py apikey_create`.
        return False


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "tenant", "api_key", "model", "status_code", "outcome", "total_tokens", "latency_ms")
    list_filter = ("outcome", "stream")
    list_select_related = ("tenant", "api_key")
    search_fields = ("request_id", "response_id")
    # The table grows fast: no COUNT(*) of the whole table per page.
    show_full_result_count = False


@admin.register(PriceVersion)
class PriceVersionAdmin(AppendOnlyAdmin):
    """Price versions are append-only (`manage.py price_set`): billed records point at them."""

    list_display = ("model", "input", "cached_input", "cache_write", "output", "reasoning", "effective_from")
    search_fields = ("model",)


@admin.register(BudgetAlert)
class BudgetAlertAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "scope", "scope_id", "kind", "metric", "period_start", "delivered_at", "last_error")
    list_filter = ("kind", "scope")
