"""Reads of tenants, API keys, prices and usage that other layers depend on."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Count, DecimalField, F, Q, QuerySet, Sum, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from tenancy.access import MANAGING_ROLES, is_operator
from tenancy.keys import key_prefix
from tenancy.keyset import KeysetPage, Order, Position, SortKey, keyset_page, sorted_rows
from tenancy.models import (
    COST_MAX_DIGITS,
    COST_PLACES,
    ApiKey,
    AuditEntry,
    BudgetScope,
    ConfigChange,
    Conversation,
    ConversationItem,
    Membership,
    PriceVersion,
    StoredResponse,
    Tenant,
    UsageRecord,
)
from tenancy.pricing import TOKEN_FIELDS

# The limit columns shared by keys and tenants (tenancy.models.LimitFields).
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
# The request policy only keys have.
KEY_POLICY_FIELDS = ("max_output_tokens", "reasoning_efforts", "allowed_tools", "allowed_ips")

_ZERO_COST = Value(Decimal(0), output_field=DecimalField(max_digits=COST_MAX_DIGITS, decimal_places=COST_PLACES))


def tenant_get_by_slug(slug: str) -> Tenant:
    """The tenant with ``slug``. Raises Tenant.DoesNotExist."""
    return Tenant.objects.get(slug=slug)


def apikey_get_by_prefix(prefix_or_key: str) -> ApiKey:
    """The key with this prefix (a full key is accepted too). Raises ApiKey.DoesNotExist."""
    prefix = key_prefix(prefix_or_key) or prefix_or_key
    return ApiKey.objects.select_related("tenant").get(prefix=prefix)


def apikeys_for_snapshot() -> list[dict[str, Any]]:
    """Every usable-or-expired key of an active tenant, as plain dicts, in one query.

    Keys: ``id, tenant_id, tenant_slug, prefix, digest, allowed_models, expires_at``;
    the key's limits ``rpm, tpm, concurrency, budget_usd, budget_tokens, budget_period,
    budget_window_start, budget_window_end, budget_soft_percent`` and policy
    ``max_output_tokens, reasoning_efforts, allowed_tools, allowed_ips``, ``stateful`` (None:
    the tenant's ``tenant_stateful``); and the tenant's
    limits under the same names prefixed ``tenant_`` (``tenant_rpm`` ...). A None limit or
    policy is unlimited / unrestricted (types: see tenancy.models; ``budget_usd`` is a
    Decimal, windows aware datetimes).

    Revoked keys and keys of inactive tenants are left out. Expired keys are kept,
    with ``expires_at`` (aware datetime or None): the gateway checks expiry per
    request, since a snapshot outlives the moment a key expires.
    """
    return [dict(row) for row in _usable_keys().order_by("id")]


def _usable_keys(*extra: str) -> Any:
    """The non-revoked keys of active tenants, as the snapshot's dicts (a lazy values() queryset)."""
    tenant_limits = {f"tenant_{name}": F(f"tenant__{name}") for name in LIMIT_FIELDS}
    return ApiKey.objects.filter(revoked_at__isnull=True, tenant__is_active=True).values(
        "id",
        "tenant_id",
        "prefix",
        "digest",
        "allowed_models",
        "expires_at",
        *extra,
        *LIMIT_FIELDS,
        *KEY_POLICY_FIELDS,
        "stateful",
        tenant_slug=F("tenant__slug"),
        tenant_stateful=F("tenant__stateful"),
        **tenant_limits,
    )


def apikeys_for_snapshot_by_prefix(prefixes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The keys with these prefixes as :func:`apikeys_for_snapshot` gives them, by prefix; a
    prefix that is unknown, revoked, or of an inactive tenant is absent. One query through the
    unique index on the prefix (and the index on the previous prefix), however many prefixes.

    A key rotated with a grace period answers for its previous prefix too, until the grace
    ends: the same key (id, limits) with the previous digest, expiring when the grace does.
    """
    wanted = list(prefixes)
    now = timezone.now()
    rows = _usable_keys("previous_prefix", "previous_digest", "previous_valid_until").filter(
        Q(prefix__in=wanted) | Q(previous_prefix__in=wanted, previous_valid_until__gt=now)
    )
    found: dict[str, dict[str, Any]] = {}
    asked = set(wanted)
    for row in rows:
        previous = (row.pop("previous_prefix"), row.pop("previous_digest"), row.pop("previous_valid_until"))
        if row["prefix"] in asked:
            found[row["prefix"]] = dict(row)
        prefix, digest, until = previous
        if prefix in asked and until is not None and until > now:
            expires = row["expires_at"]
            found[prefix] = {**row, "prefix": prefix, "digest": digest, "expires_at": min(expires or until, until)}
    return found


def apikey_prefixes(chunk: int = 10_000) -> Iterator[str]:
    """Every stored key prefix (revoked ones included, and the previous prefix of a rotated key),
    streamed: read in chunks."""
    current = ApiKey.objects.values_list("prefix", flat=True).order_by().iterator(chunk_size=chunk)
    previous = ApiKey.objects.exclude(previous_prefix="").values_list("previous_prefix", flat=True).order_by()
    return itertools.chain(current, previous.iterator(chunk_size=chunk))


def config_change_last() -> int:
    """The id of the newest change in the feed (0 when it is empty)."""
    last = ConfigChange.objects.order_by("-id").values_list("id", flat=True).first()
    return int(last or 0)


def config_changes_since(after: int, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` changes with an id above ``after``, oldest first (a primary-key range).

    Keys: ``id, kind, prefix, tenant_id`` (see tenancy.models.ConfigChange).
    """
    rows = ConfigChange.objects.filter(id__gt=after).order_by("id").values("id", "kind", "prefix", "tenant_id")
    return [dict(row) for row in rows[:limit]]


def prices_for_snapshot() -> list[dict[str, Any]]:
    """Every price version, oldest first per model, as plain dicts, in one query.

    Keys: ``id, model, input, cached_input, cache_write, output, reasoning, effective_from``
    (USD per million tokens as Decimals, ``reasoning`` None = the output price). All
    versions, future ones included, so the gateway picks the one effective at request
    time (``tenancy.pricing.PriceTable``) and a scheduled price change needs no reload.
    """
    rows = PriceVersion.objects.order_by("model", "effective_from", "id").values(
        "id", "model", "input", "cached_input", "cache_write", "output", "reasoning", "effective_from"
    )
    return [dict(row) for row in rows]


def usage_summary(api_key: ApiKey | int, since: datetime | None = None) -> dict[str, Any]:
    """The usage of one key (ApiKey or id) since ``since`` (all of it if None), in one query.

    Only that key's own usage records: never its tenant's other keys, never pool-wide or
    upstream figures. Keys: ``requests`` (every record), the token sums ``input_tokens,
    cached_tokens, cache_write_tokens, output_tokens, reasoning_tokens, total_tokens`` (ints;
    a null token count is skipped, not taken as zero), ``cost`` (Decimal USD, sum of the
    known costs), ``requests_with_unknown_usage`` (records whose input or output tokens are
    unknown) and ``requests_with_unknown_cost`` (records without a cost: unknown usage or
    no price for the model).
    """
    key_id = api_key.pk if isinstance(api_key, ApiKey) else int(api_key)
    records = UsageRecord.objects.filter(api_key_id=key_id)
    if since is not None:
        records = records.filter(created_at__gte=since)
    # Aliases differ from the column names: an alias named like a column would shadow it
    # in the other aggregates' filters.
    sums: dict[str, Any] = {f"sum_{name}": Coalesce(Sum(name), 0) for name in TOKEN_FIELDS}
    totals = records.aggregate(
        n_requests=Count("id"),
        sum_cost=Coalesce(Sum("cost"), _ZERO_COST),
        n_unknown_usage=Count("id", filter=Q(input_tokens__isnull=True) | Q(output_tokens__isnull=True)),
        n_unknown_cost=Count("id", filter=Q(cost__isnull=True)),
        **sums,
    )
    return {
        "requests": int(totals["n_requests"]),
        **{name: int(totals[f"sum_{name}"]) for name in TOKEN_FIELDS},
        "cost": Decimal(totals["sum_cost"]),
        "requests_with_unknown_usage": int(totals["n_unknown_usage"]),
        "requests_with_unknown_cost": int(totals["n_unknown_cost"]),
    }


def budget_spent(scope: str, scope_id: int, start: datetime, end: datetime) -> tuple[int, Decimal]:
    """``(tokens, cost)`` recorded for a key or tenant in ``[start, end)``, in one query.

    ``scope``: "key" (``scope_id`` = ApiKey id) or "tenant" (Tenant id: all its keys).
    Tokens are the sum of known ``total_tokens``, cost the sum of known costs (USD).
    Used to seed budget counters (e.g. after a Redis restart); requests still in flight
    or not yet flushed by the usage meter are not in it.
    """
    if scope == BudgetScope.KEY:
        records = UsageRecord.objects.filter(api_key_id=scope_id)
    elif scope == BudgetScope.TENANT:
        records = UsageRecord.objects.filter(tenant_id=scope_id)
    else:
        raise ValueError(f"unknown budget scope {scope!r}")
    totals = records.filter(created_at__gte=start, created_at__lt=end).aggregate(
        sum_tokens=Coalesce(Sum("total_tokens"), 0), sum_cost=Coalesce(Sum("cost"), _ZERO_COST)
    )
    return int(totals["sum_tokens"]), Decimal(totals["sum_cost"])


# Ids per IN (...) list: well under SQLite's bound on query parameters.
_IDS_PER_QUERY = 500


def budget_spent_many(
    scope: str, scope_ids: Sequence[int], start: datetime, end: datetime
) -> dict[int, tuple[int, Decimal]]:
    """:func:`budget_spent` for many keys (or tenants) sharing one window: one query per 500 ids.

    Every id asked for is in the result, with ``(0, Decimal(0))`` when nothing was recorded.
    """
    if scope == BudgetScope.KEY:
        column = "api_key_id"
    elif scope == BudgetScope.TENANT:
        column = "tenant_id"
    else:
        raise ValueError(f"unknown budget scope {scope!r}")
    ids = sorted(set(scope_ids))
    spent: dict[int, tuple[int, Decimal]] = {scope_id: (0, Decimal(0)) for scope_id in ids}
    for first in range(0, len(ids), _IDS_PER_QUERY):
        chunk = ids[first : first + _IDS_PER_QUERY]
        rows = (
            UsageRecord.objects.filter(**{f"{column}__in": chunk}, created_at__gte=start, created_at__lt=end)
            .values(column)
            .annotate(sum_tokens=Coalesce(Sum("total_tokens"), 0), sum_cost=Coalesce(Sum("cost"), _ZERO_COST))
            .order_by()
        )
        for row in rows:
            spent[int(row[column])] = (int(row["sum_tokens"]), Decimal(row["sum_cost"]))
    return spent


# --- The request log and the audit log (the API's /usage/records/ and /audit/, and the console) ---


@dataclass(frozen=True)
class RecordFilter:
    """Filters of the request log; None or "" means "any"."""

    tenant_id: int | None = None
    api_key_id: int | None = None
    account_id: int | None = None
    model: str = ""
    status_code: int | None = None
    request_id: str = ""
    start: datetime | None = None
    end: datetime | None = None


def usage_records_visible(tenant_ids: Any, wanted: RecordFilter) -> QuerySet[UsageRecord]:
    """The usage records of ``tenant_ids`` (None: every tenant) that match ``wanted``.

    Every filter is an equality or a range on an indexed column (request id, the
    ``(tenant, created_at)`` and ``(api_key, created_at)`` indexes, ``created_at``), so a
    newest-first page of it reads an index, not the table.
    """
    records = UsageRecord.objects.select_related("tenant", "api_key")
    if tenant_ids is not None:
        records = records.filter(tenant_id__in=tenant_ids)
    exact = {
        "tenant_id": wanted.tenant_id,
        "api_key_id": wanted.api_key_id,
        "account_id": wanted.account_id,
        "status_code": wanted.status_code,
        "model": wanted.model or None,
        "request_id": wanted.request_id or None,
    }
    records = records.filter(**{name: value for name, value in exact.items() if value is not None})
    if wanted.start is not None:
        records = records.filter(created_at__gte=wanted.start)
    if wanted.end is not None:
        records = records.filter(created_at__lt=wanted.end)
    return records


def usage_record_get(tenant_ids: Any, request_id: str) -> UsageRecord | None:
    """The record of the request ``request_id`` if it is of one of ``tenant_ids`` (None: any
    tenant), with its tenant and key; None otherwise.

    Read by the unique request-id index alone: no join and no ORDER BY, so no plan can walk
    another index looking for it. (``.first()`` adds ``ORDER BY id LIMIT 1``, and with missing
    or stale statistics PostgreSQL walked the primary key of every partition until the id came
    up: 445 ms on 3,000,000 records; docs/console.md, "Measurements".) Then the tenant and the
    key by primary key (and, for a member, their tenants' ids).
    """
    record = UsageRecord.objects.filter(request_id=request_id).order_by()[:1]
    found = next(iter(record), None)
    if found is None or (tenant_ids is not None and found.tenant_id not in set(tenant_ids)):
        return None
    found.tenant = Tenant.objects.get(pk=found.tenant_id)
    found.api_key = next(iter(ApiKey.objects.filter(pk=found.api_key_id)), None) if found.api_key_id else None
    return found


# The request log's orders (?sort=). Time is served by (created_at) and (tenant, created_at, id)
# (migration 0010); the others by no index: a pair of indexes per order made inserting usage
# records 2.5 times as slow on PostgreSQL (random values; docs/console.md, "Sorting"), so such a page sorts the
# records of a bounded date range instead (usage_sort_start, UNINDEXED_SORT_CAP).
USAGE_SORTS = {
    key.name: key
    for key in (
        SortKey("time", "created_at", "time"),
        SortKey("latency", "latency_ms", "float", indexed=False),
        SortKey("cost", "cost", "decimal", nullable=True, indexed=False),
        SortKey("tokens", "total_tokens", "int", nullable=True, indexed=False),
        SortKey("status", "status_code", "int", indexed=False),
    )
}
USAGE_NEWEST_FIRST = Order(USAGE_SORTS["time"], descending=True)
# The filters that no index combines with an order other than time (docs/console.md).
UNINDEXED_WITH_SORT = ("api_key_id", "account_id", "model", "status_code")
# The most records a page in an order no index serves may sort (more: TooManyToSort).
UNINDEXED_SORT_CAP = 100_000


class TooManyToSort(Exception):
    """More records match than a page in an order no index serves may sort."""


def usage_order_indexed(wanted: RecordFilter, order: Order) -> bool:
    """Whether an index serves the records matching ``wanted`` in ``order``: time with any
    filter (migration 0010), and a request id (one record); no other order has an index."""
    if order.key.name == "time" or wanted.request_id:
        return True
    if not order.key.indexed:
        return False
    return all(getattr(wanted, name) in (None, "") for name in UNINDEXED_WITH_SORT)


def usage_sort_start(tenant_ids: Any, wanted: RecordFilter, since: datetime) -> datetime:
    """The start of the default range a page in an order no index serves sorts: ``since``, or
    later when more than :data:`UNINDEXED_SORT_CAP` records of ``tenant_ids`` (None: every
    tenant) matching ``wanted`` came after it: then just after the time of the newest cap-th
    one (read down the time index, at most cap entries), so that the page sorts the newest
    requests, fewer than the cap however many share a time."""
    rows = usage_records_visible(None, replace(wanted, start=since))
    if tenant_ids is not None:
        rows = rows.filter(tenant_id__in=sorted(set(tenant_ids)))
    newest = rows.order_by("-created_at").values_list("created_at", flat=True)
    boundary = next(iter(newest[UNINDEXED_SORT_CAP - 1 : UNINDEXED_SORT_CAP]), None)
    return max(since, boundary + timedelta(microseconds=1)) if boundary is not None else since


def usage_records_page(
    tenant_ids: Any,
    wanted: RecordFilter,
    order: Order = USAGE_NEWEST_FIRST,
    *,
    after: Position | None = None,
    before: Position | None = None,
    size: int = 50,
) -> KeysetPage[UsageRecord]:
    """A page of the request log: the records of ``tenant_ids`` (None: every tenant) matching
    ``wanted``, in ``order``, after or before a position (tenancy.keyset).

    Index-served (:func:`usage_order_indexed`): one range read of ``size + 1`` records per
    query, whatever the table's size (migrations 0010 and 0011). A member of several tenants
    with no tenant filter: one query per tenant, merged (each its own index range). A request
    id: at most one record, read by its unique index with no order at all (so no plan walks
    another index looking for it) and sorted here.

    Not index-served: the matching records are read through the filter's own index and sorted
    (tenancy.keyset, ``indexed=False``), at most :data:`UNINDEXED_SORT_CAP` of them: a first
    query counts them up to the cap (``LIMIT cap + 1``), and beyond it the page is refused with
    :class:`TooManyToSort` (callers narrow the date range).
    """
    rows = usage_records_visible(None, wanted)
    ids = None if tenant_ids is None else sorted(set(tenant_ids))
    if ids is not None and wanted.tenant_id is not None and wanted.tenant_id not in ids:
        return KeysetPage([], None, None)
    one_scope = ids is None or wanted.tenant_id is not None  # every tenant, or the one asked for
    scopes = [rows] if one_scope else [rows.filter(tenant_id=tenant_id) for tenant_id in ids or ()]
    if not scopes:
        return KeysetPage([], None, None)
    if wanted.request_id:
        found = [record for scope in scopes for record in scope.order_by()[:size]]
        return KeysetPage(sorted_rows(found, order)[:size], None, None)
    if usage_order_indexed(wanted, order):
        return keyset_page(scopes, order, after=after, before=before, size=size)
    matching = rows if one_scope else rows.filter(tenant_id__in=ids)
    # created_at: a column of every filter's index, so the count can read the index alone
    if matching.order_by().values("created_at")[: UNINDEXED_SORT_CAP + 1].count() > UNINDEXED_SORT_CAP:
        raise TooManyToSort(f"more than {UNINDEXED_SORT_CAP:,} requests match")
    return keyset_page([matching], order, after=after, before=before, size=size, indexed=False)


AUDIT_SORTS = {
    key.name: key
    for key in (
        # the order entries were written in (created_at is set just before, so it agrees to the
        # millisecond); indexes: the primary key, (tenant_id, id), (action, id)
        SortKey("time", "pk", "id"),
        SortKey("actor", "actor_label", "text"),
        SortKey("action", "action", "text"),
    )
}
AUDIT_NEWEST_FIRST = Order(AUDIT_SORTS["time"], descending=True)


def audit_entries_page(
    user: Any,
    *,
    tenant_id: int | None = None,
    action: str = "",
    order: Order = AUDIT_NEWEST_FIRST,
    after: Position | None = None,
    before: Position | None = None,
    size: int = 50,
) -> KeysetPage[AuditEntry]:
    """A page of the audit log ``user`` may read (:func:`audit_entries_visible`), of one tenant
    and one action if given, in ``order`` (one query; tenancy.keyset).

    Index-served (migration 0011): every order alone, or with a tenant (``(tenant_id, column,
    id)``), and time or action with an action filter (``(action, id)``, ``(tenant_id, action,
    id)``). An actor order with an action filter walks the actor index; the audit log holds
    people's changes (thousands of rows, not millions), so that stays cheap.
    """
    entries = audit_entries_visible(user)
    if tenant_id is not None:
        entries = entries.filter(tenant_id=tenant_id)
    if action:
        entries = entries.filter(action=action)
    return keyset_page([entries], order, after=after, before=before, size=size)


def audit_entries_visible(user: Any) -> QuerySet[AuditEntry]:
    """The audit entries ``user`` may read: all for an operator, their tenants' for owners and
    admins, none for anyone else (viewers)."""
    entries = AuditEntry.objects.all()
    if is_operator(user):
        return entries
    managed = Membership.objects.filter(user_id=user.pk or 0, role__in=MANAGING_ROLES)
    return entries.filter(tenant_id__in=managed.values_list("tenant_id", flat=True))


# --- the stateful policy's stored objects (every read scoped by tenant) ---------------------------


def stored_response_get(tenant_id: int, response_id: str) -> StoredResponse | None:
    """The tenant's stored response ``response_id``; None for an unknown id or another tenant's."""
    return StoredResponse.objects.filter(tenant_id=tenant_id, pk=response_id).first()


def stored_response_context(tenant_id: int, response_id: str) -> list[Any] | None:
    """What continues after the tenant's response ``response_id``: its context, input and output
    items, in order (None: no such response of this tenant)."""
    row = (
        StoredResponse.objects.filter(tenant_id=tenant_id, pk=response_id)
        .values_list("context", "input_items", "output")
        .first()
    )
    if row is None:
        return None
    context, inputs, output = row
    return [*context, *inputs, *output]


def conversation_get(tenant_id: int, conversation_id: str) -> Conversation | None:
    """The tenant's conversation ``conversation_id``; None for an unknown id or another tenant's."""
    return Conversation.objects.filter(tenant_id=tenant_id, pk=conversation_id).first()


def conversation_items_all(tenant_id: int, conversation_id: str) -> list[Any] | None:
    """Every item of the tenant's conversation, oldest first (None: no such conversation)."""
    if not Conversation.objects.filter(tenant_id=tenant_id, pk=conversation_id).exists():
        return None
    return list(
        ConversationItem.objects.filter(conversation_id=conversation_id)
        .order_by("position")
        .values_list("item", flat=True)
    )


def conversation_items_page(
    tenant_id: int, conversation_id: str, *, after: str | None, limit: int, descending: bool
) -> tuple[list[Any], bool] | None:
    """A page of the conversation's items after the item ``after`` (in the order asked) and
    whether more follow; None: no such conversation (or ``after`` is not one of its items)."""
    if not Conversation.objects.filter(tenant_id=tenant_id, pk=conversation_id).exists():
        return None
    items = ConversationItem.objects.filter(conversation_id=conversation_id)
    if after:
        cursor = items.filter(item_id=after).values_list("position", flat=True).first()
        if cursor is None:
            return None
        items = items.filter(position__lt=cursor) if descending else items.filter(position__gt=cursor)
    rows = list(items.order_by("-position" if descending else "position").values_list("item", flat=True)[: limit + 1])
    return rows[:limit], len(rows) > limit


def conversation_item_get(tenant_id: int, conversation_id: str, item_id: str) -> Any | None:
    """One item of the tenant's conversation (None: unknown conversation or item)."""
    return (
        ConversationItem.objects.filter(
            conversation__tenant_id=tenant_id, conversation_id=conversation_id, item_id=item_id
        )
        .values_list("item", flat=True)
        .first()
    )


def stored_tenants_retention() -> list[tuple[int, int | None]]:
    """``(tenant id, stored_ttl_days)`` of every tenant that has stored responses or conversations."""
    with_objects = Q(stored_responses__isnull=False) | Q(conversations__isnull=False)
    return list(Tenant.objects.filter(with_objects).distinct().values_list("id", "stored_ttl_days"))
