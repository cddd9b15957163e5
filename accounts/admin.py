"""Admin for pools and upstream accounts.

The stored credential is never displayed: ``credential_encrypted`` is excluded and a
write-only field replaces it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest

from accounts.crypto import encrypt_credential
from accounts.models import AccountTransition, ModelRoute, ModelRouteTarget, Pool, UpstreamAccount
from accounts.services import STRIP_FIELDS_HELP, strip_fields_clean, upstream_account_set_enabled


class PoolForm(forms.ModelForm):
    class Meta:
        model = Pool
        fields = ("name", "strip_fields")
        help_texts = {"strip_fields": STRIP_FIELDS_HELP}

    def clean_strip_fields(self) -> list[str] | None:
        return strip_fields_clean(self.cleaned_data.get("strip_fields"))


@admin.register(Pool)
class PoolAdmin(admin.ModelAdmin):
    form = PoolForm
    list_display = ("name", "strip_fields", "created_at")
    search_fields = ("name",)
    readonly_fields = ("created_at",)


class UpstreamAccountForm(forms.ModelForm):
    new_api_key = forms.CharField(
        required=False,
        strip=True,
        label="New API key",
        widget=forms.PasswordInput(render_value=False),
        help_text="Write-only. Leave empty to keep the stored key.",
    )
    clear_api_key = forms.BooleanField(required=False, label="Remove the stored API key")

    class Meta:
        model = UpstreamAccount
        # Not credential_encrypted: the stored key is write-only (new_api_key below).
        fields = ("pool", "name", "provider", "base_url", "models", "weight", "enabled")

    def clean_models(self) -> list[str]:
        value = self.cleaned_data.get("models")
        if not isinstance(value, list) or not value or not all(isinstance(m, str) and m.strip() for m in value):
            raise ValidationError('Give a non-empty JSON list of model names, e.g. ["gpt-4o"].')
        return [m.strip() for m in value]

    def clean_base_url(self) -> str:
        return str(self.cleaned_data.get("base_url", "")).strip().rstrip("/")


def _set_enabled_action(enabled: bool) -> Callable[..., None]:
    """The admin action that enables (or disables) the selected accounts, one service call each."""
    verb = "enable" if enabled else "disable"

    @admin.action(description=f"{verb.title()} selected accounts")
    def action(
        modeladmin: admin.ModelAdmin[UpstreamAccount], request: HttpRequest, queryset: QuerySet[UpstreamAccount]
    ) -> None:
        for account in queryset:
            upstream_account_set_enabled(account=account, enabled=enabled)
        modeladmin.message_user(request, f"Accounts {verb}d.", messages.SUCCESS)

    action.__name__ = f"{verb}_accounts"  # the admin tells actions apart by name
    return action


@admin.register(UpstreamAccount)
class UpstreamAccountAdmin(admin.ModelAdmin):
    form = UpstreamAccountForm
    list_display = ("id", "name", "pool", "base_url", "models", "weight", "enabled", "has_credential")
    list_filter = ("enabled", "pool")
    list_select_related = ("pool",)
    search_fields = ("name", "base_url")
    readonly_fields = ("has_credential", "created_at")
    actions = (_set_enabled_action(True), _set_enabled_action(False))

    @admin.display(boolean=True, description="API key set")
    def has_credential(self, obj: UpstreamAccount) -> bool:
        return bool(obj.credential_encrypted)

    def save_model(self, request: HttpRequest, obj: UpstreamAccount, form: Any, change: bool) -> None:
        new_key = form.cleaned_data.get("new_api_key")
        if form.cleaned_data.get("clear_api_key"):
            obj.credential_encrypted = ""
        elif new_key:
            obj.credential_encrypted = encrypt_credential(new_key)
        super().save_model(request, obj, form, change)


class ModelRouteTargetInline(admin.TabularInline):
    model = ModelRouteTarget
    extra = 1
    ordering = ("position",)


@admin.register(ModelRoute)
class ModelRouteAdmin(admin.ModelAdmin):
    list_display = ("model", "updated_at")
    search_fields = ("model",)
    inlines = (ModelRouteTargetInline,)


class AppendOnlyAdmin(admin.ModelAdmin):
    """Rows that never change once written (records point at them): shown, never edited here."""

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ReadOnlyAdmin(AppendOnlyAdmin):
    """Rows the system writes (logs, records): listed and shown, never added or edited here."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(AccountTransition)
class AccountTransitionAdmin(ReadOnlyAdmin):
    """The health log, written by the data plane and the probe task."""

    list_display = ("at", "account", "from_state", "to_state", "reason", "until")
    list_filter = ("to_state",)
    list_select_related = ("account",)
    show_full_result_count = False
