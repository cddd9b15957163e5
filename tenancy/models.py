"""The demand side: who calls the gateway, with which keys, and what they used."""

from __future__ import annotations

from django.db import models


class Tenant(models.Model):
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.slug


class ApiKey(models.Model):
    """A tenant's bearer key. Only a visible prefix and an HMAC digest are stored."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=200, blank=True)
    prefix = models.CharField(max_length=32, unique=True)
    digest = models.CharField(max_length=64)
    # Empty list: every model the pools serve.
    allowed_models = models.JSONField(default=list, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.tenant_id})"


class UsageRecord(models.Model):
    """One row per request that reached the data plane past authentication.

    Token fields are null when the upstream did not report them: unknown is
    not zero.
    """

    request_id = models.CharField(max_length=64, unique=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="usage_records")
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, related_name="usage_records")
    account = models.ForeignKey(
        "accounts.UpstreamAccount", on_delete=models.SET_NULL, null=True, blank=True, related_name="usage_records"
    )
    model = models.CharField(max_length=200)
    status_code = models.PositiveSmallIntegerField()
    # completed | incomplete | failed | upstream_error | client_disconnected | rejected
    outcome = models.CharField(max_length=32)
    stream = models.BooleanField(default=False)
    response_id = models.CharField(max_length=128, blank=True)
    input_tokens = models.BigIntegerField(null=True)
    cached_tokens = models.BigIntegerField(null=True)
    cache_write_tokens = models.BigIntegerField(null=True)
    output_tokens = models.BigIntegerField(null=True)
    reasoning_tokens = models.BigIntegerField(null=True)
    total_tokens = models.BigIntegerField(null=True)
    latency_ms = models.FloatField()
    ttfb_ms = models.FloatField(null=True)
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        indexes = [models.Index(fields=["tenant", "created_at"]), models.Index(fields=["api_key", "created_at"])]

    def __str__(self) -> str:
        return self.request_id
