"""The demand side: who calls the gateway, with which keys and limits, and what they used."""

from __future__ import annotations

import ipaddress
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models.functions import Coalesce

# Largest budget in USD that budget_usd holds (max_digits=14, decimal_places=6).
BUDGET_USD_MAX_DIGITS = 14
BUDGET_USD_PLACES = 6
# Prices: USD per million tokens, e.g. 0.075000.
PRICE_MAX_DIGITS = 14
PRICE_PLACES = 6
# Costs: USD with nano-dollar precision (tenancy.pricing.COST_PLACES).
COST_MAX_DIGITS = 20
COST_PLACES = 9


class BudgetPeriod(models.TextChoices):
    """The window a budget counts spend in (see tenancy.pricing.budget_window): all UTC."""

    DAY = "day", "day"
    WEEK = "week", "ISO week (from Monday)"
    MONTH = "month", "calendar month"
    FIXED = "fixed", "fixed window"


def validate_string_list(value: Any) -> None:
    """A JSON list of non-empty strings, or null."""
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        raise ValidationError("must be a list of non-empty strings.", code="invalid")


def validate_cidr_list(value: Any) -> None:
    """A non-empty JSON list of CIDR strings (a bare address is a /32 or /128), or null."""
    if value is None:
        return
    validate_string_list(value)
    if not value:
        raise ValidationError("must list at least one address or network (null allows any).", code="invalid")
    for item in value:
        try:
            ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            raise ValidationError(f"{item!r} is not an IP address or CIDR network.", code="invalid") from None


class LimitFields(models.Model):
    """Limits shared by tenants and keys. Every limit is null when unlimited.

    A request is checked against its key's limits and its tenant's limits; both apply.
    Budgets count spend (``budget_usd``, in USD at the price table's rates) and tokens
    (``budget_tokens``, ``total_tokens`` of usage records) inside the current budget
    window: the ``budget_period`` in UTC, or ``[budget_window_start, budget_window_end)``
    for ``fixed`` (outside that window the budget does not apply). Reaching
    ``budget_soft_percent`` % of a budget records an alert; reaching 100 % blocks.
    """

    rpm = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1)])
    tpm = models.PositiveBigIntegerField(null=True, blank=True, validators=[MinValueValidator(1)])
    concurrency = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1)])
    budget_usd = models.DecimalField(
        max_digits=BUDGET_USD_MAX_DIGITS,
        decimal_places=BUDGET_USD_PLACES,
        null=True,
        blank=True,
        validators=[MinValueValidator(Decimal("0.000001"))],
    )
    budget_tokens = models.PositiveBigIntegerField(null=True, blank=True, validators=[MinValueValidator(1)])
    budget_period = models.CharField(max_length=8, choices=BudgetPeriod.choices, default=BudgetPeriod.MONTH)
    # Only for budget_period = fixed (both set, end after start); null otherwise.
    budget_window_start = models.DateTimeField(null=True, blank=True)
    budget_window_end = models.DateTimeField(null=True, blank=True)
    # Null: no soft alert, only the hard block at 100 %.
    budget_soft_percent = models.PositiveSmallIntegerField(
        null=True, blank=True, default=80, validators=[MinValueValidator(1), MaxValueValidator(100)]
    )

    class Meta:
        abstract = True

    def clean(self) -> None:
        super().clean()
        if self.budget_period == BudgetPeriod.FIXED:
            if self.budget_window_start is None or self.budget_window_end is None:
                raise ValidationError("a fixed budget period needs a window start and end.", code="invalid")
            if self.budget_window_end <= self.budget_window_start:
                raise ValidationError("the budget window must end after it starts.", code="invalid")
        elif self.budget_window_start is not None or self.budget_window_end is not None:
            raise ValidationError("a budget window is only used with the fixed budget period.", code="invalid")


def validate_time_zone(value: Any) -> None:
    """An IANA time zone name zoneinfo knows (tenancy.billing.time_zone_validate)."""
    from tenancy.zones import time_zone_validate

    try:
        time_zone_validate(value)
    except ValueError as exc:
        raise ValidationError(str(exc), code="invalid") from None


class Tenant(LimitFields):
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Reporting time zone: the tenant's days, months and statements follow it (tenancy.billing).
    time_zone = models.CharField(max_length=64, default="UTC", validators=[validate_time_zone])
    # The time zone its daily rollups (UsageRollupDay) are built in: equal to time_zone except
    # while a change of time_zone is being rebuilt (tenancy.services.rollups.rollup_days_rebuild).
    rollup_time_zone = models.CharField(max_length=64, default="UTC")
    # The stateful policy (docs/contract.md, "Stateful policy"): stored responses and
    # conversations for the tenant's keys (a key's own ``stateful`` overrides it).
    stateful = models.BooleanField(default=False)
    # Retention of the stored responses and conversations, in days (null: GATEWAY_STORED_TTL_DAYS).
    stored_ttl_days = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1)])

    def __str__(self) -> str:
        return self.slug


class ApiKey(LimitFields):
    """A tenant's bearer key. Only a visible prefix and an HMAC digest are stored.

    Besides the shared limits, a key carries a request policy (null = no restriction):
    ``max_output_tokens`` caps the request's ``max_output_tokens`` (clamped where the pool
    forwards the field, and the bound of every budget estimate), ``reasoning_efforts`` lists
    the accepted ``reasoning.effort`` values (lowercase), ``allowed_tools`` the accepted tool
    ``type`` values (an empty list: no tools at all), ``allowed_ips`` the client networks
    (normalized CIDR strings) the key may be used from.
    """

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
    max_output_tokens = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1)])
    reasoning_efforts = models.JSONField(null=True, blank=True, validators=[validate_string_list])
    allowed_tools = models.JSONField(null=True, blank=True, validators=[validate_string_list])
    allowed_ips = models.JSONField(null=True, blank=True, validators=[validate_cidr_list])
    # The stateful policy of this key: null follows the tenant's ``stateful``.
    stateful = models.BooleanField(null=True, blank=True)
    # Rotation (tenancy/services/keys.py apikey_rotate): the secret before the last rotation stays
    # valid until previous_valid_until (its prefix and digest, like the current ones); the last
    # rotation's answer is replayable for an Idempotency-Key, its secret kept encrypted for a day.
    previous_prefix = models.CharField(max_length=32, blank=True, db_index=True)
    previous_digest = models.CharField(max_length=64, blank=True)
    previous_valid_until = models.DateTimeField(null=True, blank=True)
    rotated_at = models.DateTimeField(null=True, blank=True)
    rotation_idempotency_key = models.CharField(max_length=200, blank=True)
    rotation_grace_seconds = models.PositiveIntegerField(null=True, blank=True)
    rotation_secret_encrypted = models.TextField(blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.tenant_id})"


class PriceVersion(models.Model):
    """One version of a model's price, in USD per million tokens. Rows are never edited.

    The price applied to a request is the row of its model with the greatest
    ``effective_from <= request time`` (ties: the greatest id, i.e. the last one set).
    ``reasoning`` null: reasoning tokens cost the ``output`` price. How a usage is priced,
    without counting any token twice, is ``tenancy.pricing.cost_usd``.
    """

    model = models.CharField(max_length=200)
    input = models.DecimalField(max_digits=PRICE_MAX_DIGITS, decimal_places=PRICE_PLACES)
    cached_input = models.DecimalField(max_digits=PRICE_MAX_DIGITS, decimal_places=PRICE_PLACES)
    cache_write = models.DecimalField(max_digits=PRICE_MAX_DIGITS, decimal_places=PRICE_PLACES)
    output = models.DecimalField(max_digits=PRICE_MAX_DIGITS, decimal_places=PRICE_PLACES)
    reasoning = models.DecimalField(max_digits=PRICE_MAX_DIGITS, decimal_places=PRICE_PLACES, null=True, blank=True)
    effective_from = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model", "effective_from", "id"]
        indexes = [models.Index(fields=["model", "effective_from"])]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(input__gte=0, cached_input__gte=0, cache_write__gte=0, output__gte=0)
                & (models.Q(reasoning__isnull=True) | models.Q(reasoning__gte=0)),
                name="tenancy_priceversion_non_negative",
            )
        ]

    def __str__(self) -> str:
        return f"{self.model} from {self.effective_from.isoformat()}"


class BudgetScope(models.TextChoices):
    KEY = "key", "API key"
    TENANT = "tenant", "tenant"


class BudgetAlertKind(models.TextChoices):
    SOFT = "soft", "soft threshold reached"
    HARD = "hard", "hard limit reached"


class BudgetAlert(models.Model):
    """A budget threshold crossed by a key or a tenant: at most one per kind and period.

    ``scope_id`` is the ApiKey or Tenant id (per ``scope``); ``tenant`` is the tenant in
    both cases, for listings. Delivery to ``GATEWAY_ALERT_WEBHOOK_URL`` (if set) is
    recorded in ``delivered_at``, or the last failure in ``last_error``.
    """

    scope = models.CharField(max_length=8, choices=BudgetScope.choices)
    scope_id = models.BigIntegerField()
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="budget_alerts")
    kind = models.CharField(max_length=8, choices=BudgetAlertKind.choices)
    # The budget that was crossed: "usd", "tokens", or "" when unknown.
    metric = models.CharField(max_length=8, blank=True)
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    spent_usd = models.DecimalField(max_digits=COST_MAX_DIGITS, decimal_places=COST_PLACES, null=True, blank=True)
    spent_tokens = models.BigIntegerField(null=True, blank=True)
    limit_usd = models.DecimalField(
        max_digits=BUDGET_USD_MAX_DIGITS, decimal_places=BUDGET_USD_PLACES, null=True, blank=True
    )
    limit_tokens = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["scope", "scope_id", "period_start", "kind"], name="tenancy_budgetalert_once_per_period"
            )
        ]
        indexes = [models.Index(fields=["tenant", "created_at"])]

    def __str__(self) -> str:
        return f"{self.kind} {self.metric} budget alert for {self.scope} {self.scope_id}"


class UsageRecord(models.Model):
    """One row per request that reached the data plane past authentication.

    Token fields are null when the upstream did not report them: unknown is
    not zero. ``cost`` (USD, ``tenancy.pricing.cost_usd``) is null when the tokens are
    unknown or when no price applied to the model at that time; ``price_version`` is the
    price row that was applied (null: none).
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
    cost = models.DecimalField(max_digits=COST_MAX_DIGITS, decimal_places=COST_PLACES, null=True)
    # PROTECT: a price that billed requests stays, so every cost can be explained.
    price_version = models.ForeignKey(
        PriceVersion, on_delete=models.PROTECT, null=True, blank=True, related_name="usage_records"
    )
    latency_ms = models.FloatField()
    ttfb_ms = models.FloatField(null=True)
    created_at = models.DateTimeField(db_index=True)
    # Failed attempts on other accounts before the answer (failover), each with its
    # account_id, outcome, status and whatever usage the upstream reported, so billing
    # can account for them: [{"account_id", "outcome", "status", "input_tokens", ...}].
    attempts = models.JSONField(default=list, blank=True)

    class Meta:
        # The request log's filters, newest first with keyset pagination (created_at, id): each
        # filter has an index that gives its rows in that order, so a page reads ~51 entries
        # whatever the filter (docs/console.md, "Measurements").
        indexes = [
            models.Index(fields=["tenant", "created_at", "id"], name="usage_tenant_time_id"),
            models.Index(fields=["api_key", "created_at"]),
            models.Index(fields=["model", "created_at"], name="usage_model_time"),
            models.Index(fields=["account", "created_at"], name="usage_account_time"),
            models.Index(
                fields=["status_code", "created_at"], name="usage_error_time", condition=models.Q(status_code__gte=400)
            ),
            # No index for the log's other orders (tenancy.selectors.USAGE_SORTS): a page sorts
            # a bounded date range (a pair per order made inserts 2.5 times as slow).
        ]

    def __str__(self) -> str:
        return self.request_id


class ConfigChange(models.Model):
    """One configuration write, in commit order: the change feed every gateway replica reads.

    ``kind``: ``key`` (an API key created, changed, revoked or deleted: ``prefix``),
    ``tenant`` (a tenant changed or deleted: ``tenant_id``, its keys' limits and activity) or
    ``config`` (prices, pools, accounts, routes: the small rest of the snapshot). A replica
    remembers the last ``id`` it applied and, when the change token moves, reads the rows
    after it (primary-key range) and drops only those keys from its cache. Rows older than
    a day are pruned (tenancy.services.changes).
    """

    KEY = "key"
    TENANT = "tenant"
    CONFIG = "config"

    kind = models.CharField(max_length=8)
    prefix = models.CharField(max_length=32, blank=True)
    tenant_id = models.BigIntegerField(null=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    def __str__(self) -> str:
        return f"{self.kind} change {self.pk}"


class Role(models.TextChoices):
    """A member's role in a tenant: owners and admins manage it, viewers only read."""

    OWNER = "owner", "owner"
    ADMIN = "admin", "admin"
    VIEWER = "viewer", "viewer"


class Membership(models.Model):
    """A person's role in one tenant (a person may belong to several).

    Platform operators (``User.is_staff``) need no membership: they see every tenant.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=8, choices=Role.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "tenant"], name="membership_user_tenant")]

    def __str__(self) -> str:
        return f"{self.user_id} in {self.tenant_id} as {self.role}"


class AccessToken(models.Model):
    """A personal access token for the management API (never for /v1/*).

    Stored like API keys (tenancy.keys): a visible prefix and an HMAC digest; the token is
    shown once, at creation. It acts as its user, with the user's roles, until it expires or
    is revoked.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="access_tokens")
    name = models.CharField(max_length=200, blank=True)
    prefix = models.CharField(max_length=32, unique=True)
    digest = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user_id})"


class AuditEntryQuerySet(models.QuerySet["AuditEntry"]):
    """Append-only: bulk updates and deletes are refused."""

    def update(self, **kwargs: Any) -> int:
        raise PermissionError("the audit log is append-only")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise PermissionError("the audit log is append-only")


class AuditEntry(models.Model):
    """One change made through a service: who, what, when, before and after (never a secret).

    Append-only: an existing row is never saved again or deleted (the model and its queryset
    refuse). Targets and tenants are recorded by id, not by foreign key, so the entry outlives
    what it describes. A key appears by its id and visible prefix only.
    """

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor_id = models.BigIntegerField(null=True)  # the user; null: the system
    actor_label = models.CharField(max_length=200)
    token_prefix = models.CharField(max_length=32, blank=True)
    source = models.CharField(max_length=16)  # api, console, command, system
    ip = models.GenericIPAddressField(null=True)
    request_id = models.CharField(max_length=64, blank=True)
    tenant_id = models.BigIntegerField(null=True, db_index=True)
    action = models.CharField(max_length=64)
    target_type = models.CharField(max_length=64)
    target_id = models.CharField(max_length=64)
    target_label = models.CharField(max_length=200, blank=True)
    before = models.JSONField(null=True)
    after = models.JSONField(null=True)

    objects = AuditEntryQuerySet.as_manager()

    class Meta:
        indexes = [
            models.Index(fields=["tenant_id", "id"]),
            # The console's orders (tenancy.selectors.AUDIT_SORTS), keyset on (column, id).
            models.Index(fields=["actor_label", "id"], name="audit_actor_id"),
            models.Index(fields=["tenant_id", "actor_label", "id"], name="audit_tenant_actor_id"),
            models.Index(fields=["action", "id"], name="audit_action_id"),
            models.Index(fields=["tenant_id", "action", "id"], name="audit_tenant_action_id"),
        ]

    def __str__(self) -> str:
        return f"{self.action} {self.target_type}:{self.target_id} by {self.actor_label}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise PermissionError("the audit log is append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise PermissionError("the audit log is append-only")


class RollupMeasures(models.Model):
    """What a rollup row sums (tenancy.billing.COUNT_FIELDS, HIST_FIELDS).

    Token counts per billed kind (tenancy.pricing.billed_tokens): ``input_tokens`` of the
    Responses usage = uncached + cached + cache write, ``output_tokens`` = visible + reasoning.
    ``cost_pusd``: exact cost in pico-USD (1e-12 USD) at the row's price version.
    Histograms: sparse log-scale latency and time-to-first-byte bins (tenancy.billing).
    """

    requests = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0)
    failed_attempts = models.BigIntegerField(default=0)
    unknown_usage = models.BigIntegerField(default=0)
    input_uncached_tokens = models.BigIntegerField(default=0)
    input_cached_tokens = models.BigIntegerField(default=0)
    input_cache_write_tokens = models.BigIntegerField(default=0)
    output_visible_tokens = models.BigIntegerField(default=0)
    output_reasoning_tokens = models.BigIntegerField(default=0)
    cost_pusd = models.BigIntegerField(default=0)
    latency_hist = models.JSONField(default=dict)
    ttfb_hist = models.JSONField(default=dict)

    class Meta:
        abstract = True


class UsageRollup(RollupMeasures):
    """Usage per 15-minute UTC bucket and (tenant, key, model, upstream account, price version).

    Derived from the usage records only, never incremented: tenancy.services.rollups
    recomputes whole buckets (delete and insert in one transaction). Key and account are plain
    ids (null: none), so a deleted key or account keeps its history.
    """

    bucket_start = models.DateTimeField()
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    api_key_id = models.BigIntegerField(null=True)
    model = models.CharField(max_length=200)
    account_id = models.BigIntegerField(null=True)
    price_version = models.ForeignKey(PriceVersion, on_delete=models.PROTECT, null=True, related_name="+")

    class Meta:
        indexes = [
            models.Index(fields=["bucket_start"], name="tenancy_rollup_bucket"),
            models.Index(fields=["tenant", "bucket_start"], name="tenancy_rollup_tenant_bucket"),
        ]
        constraints = [
            models.UniqueConstraint(
                "bucket_start",
                "tenant",
                Coalesce("api_key_id", models.Value(0)),
                "model",
                Coalesce("account_id", models.Value(0)),
                Coalesce("price_version", models.Value(0)),
                name="tenancy_rollup_once",
            )
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.model} at {self.bucket_start.isoformat()}"


class UsageRollupDay(RollupMeasures):
    """The 15-minute rollups of one local day of the tenant (in ``time_zone``), summed: what
    day and month reports and statements read. Rebuilt from UsageRollup whenever one of the
    day's buckets is recomputed."""

    day = models.DateField()
    time_zone = models.CharField(max_length=64)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    api_key_id = models.BigIntegerField(null=True)
    model = models.CharField(max_length=200)
    account_id = models.BigIntegerField(null=True)
    price_version = models.ForeignKey(PriceVersion, on_delete=models.PROTECT, null=True, related_name="+")

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "day"], name="tenancy_rollupday_tenant_day"),
            models.Index(fields=["time_zone", "day"], name="tenancy_rollupday_tz_day"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.model} on {self.day.isoformat()}"


class BillingState(models.Model):
    """Named progress markers of the billing jobs, e.g. ``rollup``: the highest usage record id
    rolled up so far (the watermark) and the start of the last complete run (data as of)."""

    name = models.CharField(max_length=32, unique=True)
    last_record_id = models.BigIntegerField(default=0)
    as_of = models.DateTimeField(null=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.name


class StatementQuerySet(models.QuerySet["Statement"]):
    """Closed statements are immutable: bulk updates and deletes are refused."""

    def update(self, **kwargs: Any) -> int:
        raise PermissionError("a closed statement is immutable")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise PermissionError("a closed statement is immutable")


class Statement(models.Model):
    """A tenant's closed monthly statement (tenancy.services.statements.statement_close).

    ``lines``: the line items (model, price version, token kind, tokens, rate, amount);
    ``adjustments``: corrections of earlier closed statements found when this one was closed;
    amounts in pico-USD (``*_pusd``). Immutable once written: the model and its queryset
    refuse any change; a later correction appears as an adjustment on a later statement.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="statements")
    month = models.CharField(max_length=7)  # YYYY-MM in time_zone
    time_zone = models.CharField(max_length=64)
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    closed_at = models.DateTimeField(auto_now_add=True)
    data_as_of = models.DateTimeField(null=True)
    lines = models.JSONField(default=list)
    adjustments = models.JSONField(default=list)
    totals = models.JSONField(default=dict)
    price_version_ids = models.JSONField(default=list)

    objects = StatementQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "month"], name="tenancy_statement_once")]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.month}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise PermissionError("a closed statement is immutable")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise PermissionError("a closed statement is immutable")


class StoredResponse(models.Model):
    """A response stored by the stateful policy (gateway/dataplane/stateful.py).

    ``context`` holds the items that preceded this turn's input (the previous response's
    context, input and output, or the conversation's items), so a continuation reads one row;
    ``input_items`` the turn's own input (with ids), ``output`` the response's output items,
    ``response`` the response object as the client got it, ``events`` the stream's events
    for a replay (empty for a JSON answer). Every read is scoped by ``tenant``.
    """

    id = models.CharField(max_length=200, primary_key=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="stored_responses")
    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="stored_responses")
    previous_response_id = models.CharField(max_length=200, blank=True)
    conversation_id = models.CharField(max_length=200, blank=True)
    status = models.CharField(max_length=16)
    model = models.CharField(max_length=200)
    background = models.BooleanField(default=False)
    context = models.JSONField(default=list)
    input_items = models.JSONField(default=list)
    output = models.JSONField(default=list)
    response = models.JSONField(default=dict)
    events = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    def __str__(self) -> str:
        return self.id


class Conversation(models.Model):
    """A conversation of the Conversations API; its items are :class:`ConversationItem` rows."""

    id = models.CharField(max_length=200, primary_key=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="conversations")
    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="conversations")
    metadata = models.JSONField(default=dict)
    # The position the next appended item takes (bumped under the row's lock: appends never interleave).
    next_position = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    def __str__(self) -> str:
        return self.id


class ConversationItem(models.Model):
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="items")
    position = models.PositiveBigIntegerField()
    item_id = models.CharField(max_length=200)
    item = models.JSONField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["conversation", "position"], name="tenancy_conversationitem_position"),
        ]
        indexes = [models.Index(fields=["conversation", "item_id"])]

    def __str__(self) -> str:
        return self.item_id
