"""The supply side: upstream accounts grouped in pools."""

from __future__ import annotations

from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models

from accounts.health.machine import State

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
    class Strategy(models.TextChoices):
        """How the gateway spreads a pool's traffic over its accounts (accounts/routing/selection.py)."""

        WEIGHTED_ROUND_ROBIN = "weighted_round_robin", "weighted round robin"
        LEAST_IN_FLIGHT = "least_in_flight", "least in-flight requests"
        FILL_FIRST = "fill_first", "fill first (drain accounts in priority order)"

    name = models.SlugField(max_length=64, unique=True)
    # Null: DEFAULT_STRIP_FIELDS. A list: exactly these top-level fields are stripped.
    strip_fields = models.JSONField(null=True, blank=True)
    # Read from the config snapshot on every pick, so a change applies without a restart.
    strategy = models.CharField(max_length=32, choices=Strategy.choices, default=Strategy.WEIGHTED_ROUND_ROBIN)
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
    # Requests in flight at once on this account, counted per gateway process: with N
    # replicas the account may see up to N times this. Null: unlimited.
    max_concurrency = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1)])
    # Fill-first order inside the pool: lower first, ties by id.
    priority = models.IntegerField(default=0)
    # The operator's switch. Health (cooldowns, circuit breaker, auth failures) is kept
    # apart, in accounts.health.store, and never flips this field.
    enabled = models.BooleanField(default=True)
    # Why the operator disabled the account (shown in the admin); empty when enabled.
    disabled_reason = models.CharField(max_length=500, blank=True)
    # Set when an operator or the prober re-admits the account. It travels in the config
    # snapshot, so every replica drops older health state even without Redis.
    health_reset_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Declared last on purpose: inside this class body the name ``models`` shadows
    # the django.db.models module from here on.
    models = models.JSONField(default=list)

    def __str__(self) -> str:
        return self.name or f"account {self.pk}"


class ModelRoute(models.Model):
    """A public model name and the ordered (pool, upstream model) targets serving it.

    Without a route, a model is served by every pool with an enabled account listing it
    (accounts/routing/routes.py). With one, only its targets serve it, tried in ``position``
    order: the first is the primary, later ones are fallbacks.
    """

    model = models.CharField(max_length=200, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.model


class ModelRouteTarget(models.Model):
    route = models.ForeignKey(ModelRoute, on_delete=models.CASCADE, related_name="targets")
    position = models.PositiveSmallIntegerField()
    # Deleting a pool drops its targets; a route left without targets answers 503.
    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="route_targets")
    # The name sent upstream; accounts of ``pool`` must list it in their ``models``.
    upstream_model = models.CharField(max_length=200)

    class Meta:
        ordering = ("route", "position")
        constraints = [
            models.UniqueConstraint(fields=["route", "position"], name="accounts_route_target_position_unique"),
            models.UniqueConstraint(fields=["route", "pool", "upstream_model"], name="accounts_route_target_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.route_id}#{self.position}: {self.pool_id}/{self.upstream_model}"


# An account's health states as model choices (one list: the API schema names it HealthStateEnum).
HEALTH_STATES = [(s.value, s.value) for s in State]


class AccountTransition(models.Model):
    """The durable log of an account's health transitions (accounts/health/machine.py).

    Written in batches off the request path by ``account_transitions_write``; operator
    actions (disable, enable, reset) are logged here too. Never read by the data plane.
    """

    account = models.ForeignKey(UpstreamAccount, on_delete=models.CASCADE, related_name="transitions")
    from_state = models.CharField(max_length=16, choices=HEALTH_STATES)
    to_state = models.CharField(max_length=16, choices=HEALTH_STATES)
    reason = models.CharField(max_length=500)
    at = models.DateTimeField()
    # Cooling deadline or next circuit probe; null for healthy and disabled.
    until = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["account", "at"], name="accounts_transition_acct_at")]

    def __str__(self) -> str:
        return f"account {self.account_id}: {self.from_state} -> {self.to_state} ({self.reason})"
