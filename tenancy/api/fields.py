"""Serializer pieces shared by the demand side's endpoints: limits, the tenant named in a body."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from tenancy.models import BUDGET_USD_MAX_DIGITS, BUDGET_USD_PLACES, ApiKey, BudgetPeriod, Tenant


def _limit_fields() -> dict[str, serializers.Field[Any, Any, Any, Any]]:
    """The limit fields of a tenant (and a key): absent = unchanged, null = unlimited.

    Types only: the services validate the values and the rules between them."""

    def whole(help_text: str = "") -> serializers.IntegerField:
        return serializers.IntegerField(required=False, allow_null=True, min_value=1, help_text=help_text or None)

    return {
        "rpm": whole("Requests per minute."),
        "tpm": whole("Tokens per minute."),
        "concurrency": whole("Requests in flight at once."),
        "budget_usd": serializers.DecimalField(
            max_digits=BUDGET_USD_MAX_DIGITS, decimal_places=BUDGET_USD_PLACES, required=False, allow_null=True
        ),
        "budget_tokens": whole("Tokens per budget period."),
        "budget_period": serializers.ChoiceField(choices=BudgetPeriod.choices, required=False),
        "budget_window_start": serializers.DateTimeField(required=False, allow_null=True),
        "budget_window_end": serializers.DateTimeField(required=False, allow_null=True),
        "budget_soft_percent": serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=100),
    }


def _policy_fields() -> dict[str, serializers.Field[Any, Any, Any, Any]]:
    """A key's request policy: null = unrestricted."""

    def names() -> serializers.ListField:
        return serializers.ListField(child=serializers.CharField(max_length=64), required=False, allow_null=True)

    return {
        "max_output_tokens": serializers.IntegerField(required=False, allow_null=True, min_value=1),
        "reasoning_efforts": names(),
        "allowed_tools": names(),
        "allowed_ips": names(),
        "stateful": serializers.BooleanField(
            required=False, allow_null=True, help_text="Stateful policy; null follows the tenant's."
        ),
    }


def _tenant_fields() -> dict[str, serializers.Field[Any, Any, Any, Any]]:
    """A tenant's stateful policy and the retention of its stored objects (null: the default)."""
    return {
        "stateful": serializers.BooleanField(
            required=False, help_text="Stored responses and conversations (docs/contract.md, Stateful policy)."
        ),
        "stored_ttl_days": serializers.IntegerField(
            required=False, allow_null=True, min_value=1, max_value=36_500, help_text="Retention in days."
        ),
    }


TENANT_LIMITS = (*_limit_fields(), *_tenant_fields())
KEY_LIMITS = (*_limit_fields(), *_policy_fields())


class LimitsSerializer(serializers.Serializer[Tenant]):
    """A tenant's limits (the fields only; a base for the request bodies)."""

    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        return {**super().get_fields(), **_limit_fields(), **_tenant_fields()}


class KeyLimitsSerializer(serializers.Serializer[ApiKey]):
    """A key's limits and policy (the fields only; a base for the request bodies)."""

    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        return {**super().get_fields(), **_limit_fields(), **_policy_fields()}


def pick(data: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The given ones of ``names`` in validated ``data`` (absent stays absent: unchanged)."""
    return {name: data[name] for name in names if name in data}
