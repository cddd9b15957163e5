"""The supply side: upstream accounts grouped in pools."""

from __future__ import annotations

from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models

# Fields the seed contract strips before forwarding; a pool may narrow the list.
DEFAULT_STRIP_FIELDS = ["safety_identifier", "prompt_cache_retention", "temperature", "max_output_tokens"]


def validate_base_url(value: str) -> None:
    """Accept an http(s) URL with a host, e.g. ``https://api.openai.com/v1``.

    Deliberately looser than Django's URLValidator, which rejects single-label
    hosts such as ``http://upstream:8080/v1`` (docker-compose service names).
    """
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018  (raises ValueError on a malformed port)
    except ValueError:
        raise ValidationError("base URL is malformed.", code="invalid") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValidationError(
            "base URL must be http:// or https:// with a host, e.g. https://api.openai.com/v1.", code="invalid"
        )
    if parts.query or parts.fragment:
        raise ValidationError("base URL must not have a query string or fragment.", code="invalid")
    if parts.path.rstrip("/").endswith("/responses"):
        # The gateway appends /responses itself; a full endpoint would double it.
        raise ValidationError(
            "base URL must be the API base (e.g. https://api.openai.com/v1), without /responses.", code="invalid"
        )


class Pool(models.Model):
    name = models.SlugField(max_length=64, unique=True)
    # Null: DEFAULT_STRIP_FIELDS. A list: exactly these top-level fields are stripped.
    strip_fields = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name

    def effective_strip_fields(self) -> list[str]:
        return list(DEFAULT_STRIP_FIELDS if self.strip_fields is None else self.strip_fields)


class UpstreamAccount(models.Model):
    class Provider(models.TextChoices):
        OPENAI = "openai", "OpenAI-compatible Responses API"

    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="accounts")
    name = models.CharField(max_length=200, blank=True)
    provider = models.CharField(max_length=32, choices=Provider.choices, default=Provider.OPENAI)
    # OpenAI-compatible base, e.g. https://api.openai.com/v1; we call {base_url}/responses.
    # Not a URLField: its validator rejects single-label hosts (http://upstream:8080/v1).
    base_url = models.CharField(max_length=500, validators=[validate_base_url])
    # Fernet token of the upstream API key (GATEWAY_ENCRYPTION_KEY); empty: no credential.
    credential_encrypted = models.TextField(blank=True)
    weight = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Declared last on purpose: inside this class body the name ``models`` shadows
    # the django.db.models module from here on.
    models = models.JSONField(default=list)

    def __str__(self) -> str:
        return self.name or f"account {self.pk}"
