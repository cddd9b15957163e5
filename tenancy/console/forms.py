"""The console's forms: types and widgets only. The services validate the values and the rules
between them (their ValidationError is shown next to the field it names, common.service_errors)."""

from __future__ import annotations

import re
from typing import Any

from django import forms

from accounts.models import Pool
from tenancy.models import (
    BUDGET_USD_MAX_DIGITS,
    BUDGET_USD_PLACES,
    PRICE_MAX_DIGITS,
    PRICE_PLACES,
    BudgetPeriod,
    Role,
)
from tenancy.services.keys import ROTATION_GRACE_MAX_SECONDS

_SPLIT = re.compile(r"[,\n]")


def names(text: str) -> list[str]:
    """A comma- or line-separated list, stripped, without empty entries."""
    return [part.strip() for part in _SPLIT.split(text or "") if part.strip()]


def joined(values: list[str] | None) -> str:
    return ", ".join(values or [])


class DateTimeInput(forms.DateTimeInput):
    input_type = "datetime-local"

    def __init__(self) -> None:
        super().__init__(format="%Y-%m-%dT%H:%M")


def _whole(label: str, help_text: str = "") -> forms.IntegerField:
    return forms.IntegerField(label=label, required=False, min_value=1, help_text=help_text)


def _when(label: str, help_text: str = "") -> forms.DateTimeField:
    return forms.DateTimeField(
        label=label, required=False, widget=DateTimeInput(), input_formats=["%Y-%m-%dT%H:%M"], help_text=help_text
    )


class LimitsForm(forms.Form):
    """A tenant's (or key's) limits and budget. Blank: unlimited."""

    LIMIT_FIELDS = (
        "rpm",
        "tpm",
        "concurrency",
        "budget_usd",
        "budget_tokens",
        "budget_period",
        "budget_window_start",
        "budget_window_end",
        "budget_soft_percent",
    )

    rpm = _whole("Requests per minute", "Blank: unlimited.")
    tpm = _whole("Tokens per minute", "Blank: unlimited.")
    concurrency = _whole("Concurrent requests", "Blank: unlimited.")
    budget_usd = forms.DecimalField(
        label="Budget (USD)",
        required=False,
        max_digits=BUDGET_USD_MAX_DIGITS,
        decimal_places=BUDGET_USD_PLACES,
        min_value=0,
        help_text="Spend per budget period; blank: none.",
    )
    budget_tokens = _whole("Budget (tokens)", "Tokens per budget period; blank: none.")
    budget_period = forms.ChoiceField(label="Budget period", choices=BudgetPeriod.choices, initial=BudgetPeriod.MONTH)
    budget_window_start = _when("Fixed window start (UTC)", "Only with the fixed period.")
    budget_window_end = _when("Fixed window end (UTC)", "Only with the fixed period.")
    budget_soft_percent = forms.IntegerField(
        label="Soft alert at (%)",
        required=False,
        min_value=1,
        max_value=100,
        initial=80,
        help_text="An alert when this share of a budget is spent; blank: none.",
    )

    def limits(self) -> dict[str, Any]:
        """The limits as the services take them (blank: None, unlimited)."""
        return {name: self.cleaned_data.get(name) for name in self.LIMIT_FIELDS}

    @classmethod
    def initial_of(cls, row: Any) -> dict[str, Any]:
        return {name: getattr(row, name) for name in cls.LIMIT_FIELDS}


class TenantCreateForm(LimitsForm):
    slug = forms.SlugField(label="Slug", max_length=64, help_text="Letters, digits, - and _; used in URLs.")
    name = forms.CharField(label="Name", max_length=200, required=False, help_text="Blank: the slug.")
    field_order = ["slug", "name"]


class TenantEditForm(LimitsForm):
    name = forms.CharField(label="Name", max_length=200)
    stateful = forms.BooleanField(
        label="Stateful",
        required=False,
        help_text="Stored responses and conversations (previous_response_id, store, conversation, background).",
    )
    stored_ttl_days = _whole("Keep stored objects (days)", "Blank: the gateway's default.")
    field_order = ["name"]

    def limits(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            **super().limits(),
            "stateful": bool(data.get("stateful")),
            "stored_ttl_days": data.get("stored_ttl_days"),
        }

    @classmethod
    def initial_of(cls, row: Any) -> dict[str, Any]:
        return {**super().initial_of(row), "stateful": row.stateful, "stored_ttl_days": row.stored_ttl_days}


class MemberAddForm(forms.Form):
    username = forms.CharField(label="Username", max_length=150)
    role = forms.ChoiceField(label="Role", choices=Role.choices, initial=Role.VIEWER)
    password = forms.CharField(
        label="Initial password",
        required=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="For a new user only; blank: they sign in with single sign-on.",
    )


class MemberRoleForm(forms.Form):
    role = forms.ChoiceField(label="Role", choices=Role.choices)


class KeyForm(LimitsForm):
    """A key's details, limits and request policy."""

    POLICY_FIELDS = ("max_output_tokens", "reasoning_efforts", "allowed_tools", "allowed_ips")

    name = forms.CharField(label="Name", max_length=200, required=False)
    allowed_models = forms.CharField(
        label="Allowed models", required=False, help_text="Comma-separated; blank: every model the pools serve."
    )
    expires_at = _when("Expires at (UTC)", "Blank: never.")
    max_output_tokens = _whole("Max output tokens", "Caps max_output_tokens; blank: no cap.")
    reasoning_efforts = forms.CharField(
        label="Reasoning efforts", required=False, help_text="Comma-separated, e.g. low, medium; blank: any."
    )
    allowed_tools = forms.CharField(
        label="Allowed tool types", required=False, help_text="Comma-separated, e.g. function; blank: any."
    )
    allowed_ips = forms.CharField(
        label="Allowed client networks",
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="Addresses or CIDR networks, comma- or line-separated; blank: any.",
    )
    stateful = forms.ChoiceField(
        label="Stateful",
        required=False,
        choices=[("", "as the tenant"), ("on", "on"), ("off", "off")],
        help_text="Stored responses and conversations; overrides the tenant's setting.",
    )
    field_order = ["name", "allowed_models", "expires_at"]

    def policy(self) -> dict[str, Any]:
        data = self.cleaned_data
        lists = {
            name: names(data.get(name, "")) or None for name in ("reasoning_efforts", "allowed_tools", "allowed_ips")
        }
        stateful = {"on": True, "off": False}.get(data.get("stateful") or "")
        return {"max_output_tokens": data.get("max_output_tokens"), **lists, "stateful": stateful}

    @classmethod
    def initial_of(cls, row: Any) -> dict[str, Any]:
        initial = super().initial_of(row)
        initial.update(
            name=row.name,
            allowed_models=joined(row.allowed_models),
            expires_at=row.expires_at,
            max_output_tokens=row.max_output_tokens,
            reasoning_efforts=joined(row.reasoning_efforts),
            allowed_tools=joined(row.allowed_tools),
            allowed_ips=joined(row.allowed_ips),
            stateful={True: "on", False: "off"}.get(row.stateful, ""),
        )
        return initial


class RotateForm(forms.Form):
    grace_seconds = forms.IntegerField(
        label="Grace period (seconds)",
        min_value=0,
        max_value=ROTATION_GRACE_MAX_SECONDS,
        initial=3600,
        help_text="How long the old secret keeps working (0: refused from the next request on; 30 days at most).",
    )


class PoolForm(forms.Form):
    name = forms.SlugField(label="Pool name", max_length=64)
    strategy = forms.ChoiceField(label="Strategy", choices=Pool.Strategy.choices)


class PoolStrategyForm(forms.Form):
    strategy = forms.ChoiceField(label="Strategy", choices=Pool.Strategy.choices)


class AccountForm(forms.Form):
    pool = forms.SlugField(label="Pool", max_length=64, help_text="A pool's name; a new name creates the pool.")
    name = forms.CharField(label="Name", max_length=200, required=False)
    base_url = forms.CharField(
        label="Base URL", max_length=500, help_text="The API base, e.g. https://api.openai.com/v1 (without /responses)."
    )
    api_key = forms.CharField(
        label="Credential",
        required=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text="The upstream API key: stored encrypted, never shown again. Blank: none sent.",
    )
    models = forms.CharField(label="Models", help_text="Comma-separated model names the account serves.")
    weight = forms.IntegerField(label="Weight", min_value=1, initial=1)
    priority = forms.IntegerField(label="Priority", initial=0, help_text="Fill-first order: lower first.")
    max_concurrency = _whole("Max concurrency", "Requests in flight per gateway process; blank: unlimited.")
    enabled = forms.BooleanField(label="Enabled", required=False, initial=True)

    def account(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            "name": data["name"],
            "base_url": data["base_url"],
            "models": names(data["models"]),
            "weight": data["weight"],
            "priority": data["priority"],
            "max_concurrency": data["max_concurrency"],
            "enabled": data["enabled"],
        }


class AccountEditForm(AccountForm):
    api_key = forms.CharField(
        label="New credential",
        required=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text="Blank: keep the stored one (which is never shown).",
    )
    remove_credential = forms.BooleanField(label="Remove the stored credential", required=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        del self.fields["pool"]


class DisableForm(forms.Form):
    reason = forms.CharField(label="Reason", max_length=500, required=False, help_text="Shown with the account.")


class RouteForm(forms.Form):
    model = forms.CharField(label="Public model", max_length=200)
    targets = forms.CharField(
        label="Targets",
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="One pool:upstream-model per line, in failover order (the first is the primary).",
    )

    def target_pairs(self) -> list[tuple[str, str]]:
        pairs = []
        for line in names(self.cleaned_data["targets"]):
            pool, sep, upstream = line.partition(":")
            if not sep:
                self.add_error("targets", f"{line!r} is not pool:upstream-model.")
                return []
            pairs.append((pool.strip(), upstream.strip()))
        return pairs


def _price(label: str, required: bool = True) -> forms.DecimalField:
    return forms.DecimalField(
        label=label, required=required, max_digits=PRICE_MAX_DIGITS, decimal_places=PRICE_PLACES, min_value=0
    )


class PriceForm(forms.Form):
    model = forms.CharField(label="Model", max_length=200)
    input = _price("Input (USD / 1M tokens)")
    cached_input = _price("Cached input")
    cache_write = _price("Cache write")
    output = _price("Output")
    reasoning = _price("Reasoning", required=False)
    effective_from = _when("Effective from (UTC)", "Blank: now. Earlier versions are kept.")


class TotpConfirmForm(forms.Form):
    token = forms.CharField(
        label="Code from your authenticator app",
        max_length=8,
        widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric"}),
    )
