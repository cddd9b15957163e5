"""The role matrix of the management API (issue 12), driven by its OpenAPI schema.

Every (method, path) of the schema drf-spectacular generates must have a row in ``ROWS``, and
every row an operation in the schema: a new endpoint without a row fails
``test_every_operation_in_the_schema_has_a_row``. Each row gives the expected status for each
caller, how to fill the path's parameters and a valid body. The objects live in tenant T
(``acme``); the outsider is an admin of tenant U (``umbra``). Every call goes through the real
authentication: an ``Authorization: Bearer`` header on an APIClient, with real tokens, a real
data-plane key and a revoked token. Each cell runs in its own rolled-back transaction, so a
write in one cell never changes another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import transaction
from django.utils import timezone
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient

from accounts.services import model_route_set, pool_get_or_create, upstream_account_create
from tenancy.models import AccessToken, ApiKey, AuditEntry, Membership, Statement, Tenant, UsageRecord
from tenancy.services.keys import apikey_create
from tenancy.services.members import member_add
from tenancy.services.prices import price_set
from tenancy.services.rollups import rollup_recent
from tenancy.services.tokens import access_token_create, access_token_revoke

pytestmark = pytest.mark.django_db

# The callers, in the order of a row's expectations.
CALLERS = ("operator", "owner", "admin", "viewer", "outsider", "anonymous", "apikey", "revoked")
PEOPLE = ("operator", "owner", "admin", "viewer", "outsider")


@dataclass
class World:
    """Tenant T with an owner, an admin and a viewer; tenant U whose admin is the outsider."""

    tenant: Tenant
    other: Tenant
    users: dict[str, User]
    tokens: dict[str, str]
    token_rows: dict[str, AccessToken]
    api_key: ApiKey
    api_key_secret: str
    extra: dict[str, Any] = field(default_factory=dict)


def build_world() -> World:
    tenant = Tenant.objects.create(slug="acme", name="Acme")
    other = Tenant.objects.create(slug="umbra", name="Umbra")
    users = {"operator": User.objects.create_user("operator", is_staff=True)}
    for role in ("owner", "admin", "viewer"):
        users[role] = member_add(tenant=tenant, username=role, role=role).user
    users["outsider"] = member_add(tenant=other, username="outsider", role="admin").user
    tokens, token_rows = {}, {}
    for who, user in users.items():
        token_rows[who], tokens[who] = access_token_create(user=user, name=f"{who}'s")
    revoked_row, revoked = access_token_create(user=users["operator"], name="revoked")
    access_token_revoke(token=revoked_row)
    tokens["revoked"] = revoked
    api_key, secret = apikey_create(tenant=tenant, name="laptop")
    tokens["apikey"] = secret
    return World(tenant, other, users, tokens, token_rows, api_key, secret)


Params = Callable[[World, str], dict[str, Any]]
Body = Callable[[World], dict[str, Any]]


@dataclass(frozen=True)
class Row:
    """Expected status per caller (``CALLERS`` order), path parameters and a valid body."""

    expect: tuple[int, ...]
    params: Params = lambda world, who: {}
    body: Body | None = None

    def __post_init__(self) -> None:
        assert len(self.expect) == len(CALLERS), self.expect

    def status_for(self, who: str) -> int:
        return self.expect[CALLERS.index(who)]


def people(operator: int, owner: int, admin: int, viewer: int, outsider: int) -> tuple[int, ...]:
    """Statuses for the five people; anonymous, a data-plane key and a revoked token get 401."""
    return (operator, owner, admin, viewer, outsider, 401, 401, 401)


def everyone(status: int) -> tuple[int, ...]:
    return people(status, status, status, status, status)


def operators_only(status: int) -> tuple[int, ...]:
    """Operator-only endpoints: an authenticated non-operator gets 403 before any lookup."""
    return people(status, 403, 403, 403, 403)


def own_token(world: World, who: str) -> dict[str, Any]:
    """The caller's own token (the anonymous callers name the operator's)."""
    return {"id": world.token_rows.get(who, world.token_rows["operator"]).pk}


ROWS: dict[tuple[str, str], Row] = {
    ("GET", "/api/v1/me"): Row(everyone(200)),
    ("GET", "/api/v1/tokens/"): Row(everyone(200)),
    ("POST", "/api/v1/tokens/"): Row(everyone(201), body=lambda w: {"name": "ci", "expires_in_days": 7}),
    ("GET", "/api/v1/tokens/{id}/"): Row(everyone(200), own_token),
    ("DELETE", "/api/v1/tokens/{id}/"): Row(everyone(204), own_token),
}


# The demand side's endpoints (tenancy/api). A row's params/body functions may create the objects
# it needs (they run inside the cell's rolled-back transaction).
def tenant_t(world: World, who: str) -> dict[str, Any]:
    return {"id": world.tenant.pk}


def key_t(world: World, who: str) -> dict[str, Any]:
    return {"id": world.api_key.pk}


def viewer_membership(world: World, who: str) -> dict[str, Any]:
    return {"id": Membership.objects.get(tenant=world.tenant, user=world.users["viewer"]).pk}


def audit_entry_t(world: World, who: str) -> dict[str, Any]:
    entry = AuditEntry.objects.filter(tenant_id=world.tenant.pk).order_by("id").first()
    assert entry is not None  # creating the world's key recorded one
    return {"id": entry.pk}


def usage_record_t(world: World, who: str) -> dict[str, Any]:
    record = UsageRecord.objects.create(
        request_id="req_matrix",
        tenant=world.tenant,
        api_key=world.api_key,
        model="gpt-4.1",
        status_code=200,
        outcome="completed",
        latency_ms=12.5,
        created_at=timezone.now(),
    )
    return {"id": record.pk}


def last_month() -> str:
    first = timezone.now().replace(day=1)
    return (first - timedelta(days=1)).strftime("%Y-%m")


def closable_month(world: World) -> dict[str, Any]:
    rollup_recent()  # the rollups are complete up to now: last month can close
    return {"tenant": "acme", "month": last_month()}


def statement_t(world: World, who: str) -> dict[str, Any]:
    statement = Statement.objects.create(
        tenant=world.tenant,
        month="2026-01",
        time_zone="UTC",
        period_start=datetime(2026, 1, 1, tzinfo=UTC),
        period_end=datetime(2026, 2, 1, tzinfo=UTC),
        totals={"amount_pusd": 0, "amount_usd": "0", "requests": 0, "unknown_usage_requests": 0, "tokens": 0},
    )
    return {"id": statement.pk}


def members_only(status: int) -> tuple[int, ...]:
    """An object of tenant T: its members (and operators) read it, the outsider gets 404."""
    return people(status, status, status, status, 404)


def managers_write(status: int) -> tuple[int, ...]:
    """A write on tenant T: owners, admins and operators; the viewer 403; the outsider 404."""
    return people(status, status, status, 403, 404)


TENANCY_ROWS: dict[tuple[str, str], Row] = {
    ("GET", "/api/v1/tenants/"): Row(everyone(200)),
    ("POST", "/api/v1/tenants/"): Row(operators_only(201), body=lambda w: {"slug": "newco", "rpm": 600}),
    ("GET", "/api/v1/tenants/{id}/"): Row(members_only(200), tenant_t),
    ("PATCH", "/api/v1/tenants/{id}/"): Row(people(200, 403, 403, 403, 404), tenant_t, lambda w: {"rpm": 100}),
    ("GET", "/api/v1/keys/"): Row(everyone(200)),
    ("POST", "/api/v1/keys/"): Row(managers_write(201), body=lambda w: {"tenant": "acme", "name": "ci"}),
    ("GET", "/api/v1/keys/{id}/"): Row(members_only(200), key_t),
    ("PATCH", "/api/v1/keys/{id}/"): Row(managers_write(200), key_t, lambda w: {"name": "renamed", "rpm": 50}),
    ("DELETE", "/api/v1/keys/{id}/"): Row(managers_write(204), key_t),
    ("POST", "/api/v1/keys/{id}/rotate/"): Row(managers_write(200), key_t, lambda w: {"grace_seconds": 60}),
    ("GET", "/api/v1/members/"): Row(everyone(200)),
    ("POST", "/api/v1/members/"): Row(
        managers_write(201), body=lambda w: {"tenant": "acme", "username": "newbie", "role": "viewer"}
    ),
    ("GET", "/api/v1/members/{id}/"): Row(members_only(200), viewer_membership),
    ("PATCH", "/api/v1/members/{id}/"): Row(managers_write(200), viewer_membership, lambda w: {"role": "admin"}),
    ("DELETE", "/api/v1/members/{id}/"): Row(managers_write(204), viewer_membership),
    ("GET", "/api/v1/audit/"): Row(everyone(200)),
    # The audit log of a tenant is for its owners and admins: a viewer does not see it either.
    ("GET", "/api/v1/audit/{id}/"): Row(people(200, 200, 200, 404, 404), audit_entry_t),
    ("GET", "/api/v1/usage/records/"): Row(everyone(200)),
    ("GET", "/api/v1/usage/records/{id}/"): Row(members_only(200), usage_record_t),
    # Billing (docs/billing.md): reports and statements of the caller's tenants.
    ("GET", "/api/v1/reports/usage"): Row(everyone(200)),
    ("GET", "/api/v1/reports/reconciliation"): Row(operators_only(200)),
    ("GET", "/api/v1/statements/"): Row(everyone(200)),
    ("POST", "/api/v1/statements/"): Row(operators_only(201), body=closable_month),
    ("GET", "/api/v1/statements/{id}/"): Row(members_only(200), statement_t),
    ("GET", "/api/v1/tenants/{id}/statement/"): Row(members_only(200), tenant_t),
}


# The supply side's endpoints (accounts/api): operators only.
def a_pool(world: World, who: str = "") -> dict[str, Any]:
    return {"id": pool_get_or_create(name="main").pk}


def an_account(world: World, who: str) -> dict[str, Any]:
    account = upstream_account_create(
        pool=pool_get_or_create(name="main"), base_url="http://127.0.0.1:9/v1", models=["m"], api_key="sk-up"
    )
    return {"id": account.pk}


def a_route(world: World, who: str) -> dict[str, Any]:
    a_pool(world)
    return {"id": model_route_set(model="alias", targets=[("main", "m")]).pk}


def route_body(world: World) -> dict[str, Any]:
    a_pool(world)
    return {"model": "alias", "targets": [{"pool": "main", "upstream_model": "m"}]}


PRICE = {"input": "1", "cached_input": "0.5", "cache_write": "1", "output": "2"}


def a_price(world: World, who: str) -> dict[str, Any]:
    return {"id": price_set(model="m", input="1", cached_input="0.5", cache_write="1", output="2").pk}


ACCOUNTS_ROWS: dict[tuple[str, str], Row] = {
    ("GET", "/api/v1/pools/"): Row(operators_only(200)),
    ("POST", "/api/v1/pools/"): Row(operators_only(201), body=lambda w: {"name": "spare", "strip_fields": []}),
    ("GET", "/api/v1/pools/{id}/"): Row(operators_only(200), a_pool),
    ("PATCH", "/api/v1/pools/{id}/"): Row(operators_only(200), a_pool, lambda w: {"strip_fields": None}),
    ("DELETE", "/api/v1/pools/{id}/"): Row(
        operators_only(204), lambda w, who: {"id": pool_get_or_create(name="spare").pk}
    ),
    ("GET", "/api/v1/accounts/"): Row(operators_only(200)),
    ("POST", "/api/v1/accounts/"): Row(
        operators_only(201),
        body=lambda w: {"pool": "main", "base_url": "http://127.0.0.1:9/v1", "models": ["m"], "api_key": "sk-up"},
    ),
    ("GET", "/api/v1/accounts/{id}/"): Row(operators_only(200), an_account),
    ("PATCH", "/api/v1/accounts/{id}/"): Row(operators_only(200), an_account, lambda w: {"weight": 3}),
    ("GET", "/api/v1/accounts/{id}/transitions/"): Row(operators_only(200), an_account),
    ("POST", "/api/v1/accounts/{id}/test/"): Row(operators_only(200), an_account),
    ("GET", "/api/v1/prices/"): Row(operators_only(200)),
    ("POST", "/api/v1/prices/"): Row(operators_only(201), body=lambda w: dict(PRICE, model="m")),
    ("GET", "/api/v1/prices/{id}/"): Row(operators_only(200), a_price),
    ("POST", "/api/v1/prices/preview/"): Row(operators_only(200), body=lambda w: dict(PRICE, model="m")),
    ("GET", "/api/v1/routes/"): Row(operators_only(200)),
    ("POST", "/api/v1/routes/"): Row(operators_only(201), body=route_body),
    ("GET", "/api/v1/routes/{id}/"): Row(operators_only(200), a_route),
    ("DELETE", "/api/v1/routes/{id}/"): Row(operators_only(204), a_route),
}

ROWS.update(TENANCY_ROWS)
ROWS.update(ACCOUNTS_ROWS)

# Served outside the schema (it does not describe itself): public, yet a bad token is still refused.
EXTRA_ROWS: dict[tuple[str, str], Row] = {
    ("GET", "/api/schema/"): Row((200, 200, 200, 200, 200, 200, 401, 401)),
    ("GET", "/api/docs/"): Row((200, 200, 200, 200, 200, 200, 401, 401)),
}


def schema_operations() -> set[tuple[str, str]]:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    return {(method.upper(), path) for path, ops in schema["paths"].items() for method in ops if method != "parameters"}


def test_every_operation_in_the_schema_has_a_row_and_every_row_an_operation() -> None:
    operations = schema_operations()
    assert len(operations) >= 5  # the generator saw the API
    missing = sorted(operations - ROWS.keys())
    stale = sorted(ROWS.keys() - operations)
    assert missing == [], f"endpoints without a row in ROWS: {missing}"
    assert stale == [], f"rows for endpoints the schema does not have: {stale}"


def call(world: World, who: str, method: str, path: str, row: Row) -> Any:
    client = APIClient()
    if who != "anonymous":
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {world.tokens[who]}")
    url = path.format(**row.params(world, who))
    body = row.body(world) if row.body is not None else None
    send = getattr(client, method.lower())
    return send(url, body, format="json") if body is not None else send(url)


def run_row(method: str, path: str, row: Row) -> None:
    world = build_world()
    got, wanted = {}, {}
    for who in CALLERS:
        cache.clear()  # throttles: each cell starts from nothing
        with transaction.atomic():
            response = call(world, who, method, path, row)
            transaction.set_rollback(True)
        got[who], wanted[who] = response.status_code, row.status_for(who)
        # Whatever the status, a data-plane key never shows up in a management API answer.
        assert world.api_key_secret not in response.content.decode(errors="replace")
    assert got == wanted, f"{method} {path}"


@pytest.mark.parametrize(("method", "path"), sorted(ROWS))
def test_role_matrix(method: str, path: str) -> None:
    run_row(method, path, ROWS[(method, path)])


@pytest.mark.parametrize(("method", "path"), sorted(EXTRA_ROWS))
def test_role_matrix_outside_the_schema(method: str, path: str) -> None:
    run_row(method, path, EXTRA_ROWS[(method, path)])
