"""Limits, prices, budget alerts and usage summaries: services, selectors and the alert task."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.test import override_settings
from django.utils import timezone

from gateway.conf.celery import app as celery_app
from gateway.config import notify
from tenancy.models import ApiKey, BudgetAlert, PriceVersion, Tenant, UsageRecord
from tenancy.selectors import (
    apikeys_for_snapshot,
    budget_spent,
    budget_spent_many,
    prices_for_snapshot,
    usage_summary,
)
from tenancy.services.alerts import (
    BUDGET_ALERT_DELIVER_TASK,
    AlertDeliveryError,
    budget_alert_deliver,
    budget_alert_record,
)
from tenancy.services.keys import apikey_create, apikey_update
from tenancy.services.prices import price_set
from tenancy.services.tenants import tenant_create, tenant_update
from tenancy.services.usage import usage_records_write
from tenancy.tasks import budget_alert_deliver as budget_alert_deliver_task
from tests import harness

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def _event(request_id: str, api_key: ApiKey, created_at: datetime, **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "request_id": request_id,
        "tenant_id": api_key.tenant_id,
        "api_key_id": api_key.pk,
        "account_id": None,
        "model": "gpt-a",
        "status_code": 200,
        "outcome": "completed",
        "stream": False,
        "response_id": "",
        "input_tokens": 1000,
        "cached_tokens": 200,
        "cache_write_tokens": 0,
        "output_tokens": 100,
        "reasoning_tokens": 40,
        "total_tokens": 1100,
        "latency_ms": 5.0,
        "ttfb_ms": None,
        "created_at": created_at,
    }
    event.update(extra)
    return event


# --- limits on create and update ------------------------------------------------------------


@pytest.mark.django_db
def test_create_with_limits_normalizes() -> None:
    tenant = tenant_create(slug="acme", rpm=600, budget_usd="100.5", budget_period="week")
    assert tenant.rpm == 600
    assert Tenant.objects.get(pk=tenant.pk).budget_usd == Decimal("100.5")
    api_key, _ = apikey_create(
        tenant=tenant,
        tpm=50_000,
        concurrency=4,
        max_output_tokens=2048,
        reasoning_efforts=[" Low", "medium", "low"],
        allowed_tools=["Function", "web_search"],
        allowed_ips=["10.1.2.3", "10.9.9.9/8", "2001:db8::1/32"],
        budget_tokens=1_000_000,
        budget_soft_percent=90,
    )
    row = ApiKey.objects.get(pk=api_key.pk)
    assert row.rpm is None  # not given: unlimited
    assert (row.tpm, row.concurrency, row.max_output_tokens) == (50_000, 4, 2048)
    assert row.reasoning_efforts == ["low", "medium"]
    assert row.allowed_tools == ["function", "web_search"]
    assert row.allowed_ips == ["10.1.2.3/32", "10.0.0.0/8", "2001:db8::/32"]
    assert (row.budget_tokens, row.budget_period, row.budget_soft_percent) == (1_000_000, "month", 90)
    plain, _ = apikey_create(tenant=tenant)
    assert plain.budget_soft_percent == 80
    assert plain.reasoning_efforts is None


@pytest.mark.django_db
def test_update_sets_keeps_and_clears() -> None:
    tenant = tenant_create(slug="acme")
    api_key, _ = apikey_create(tenant=tenant, rpm=10, tpm=1000, allowed_ips=["10.0.0.0/8"])
    apikey_update(api_key=api_key, rpm=20, allowed_tools=[])
    row = ApiKey.objects.get(pk=api_key.pk)
    assert (row.rpm, row.tpm, row.allowed_tools, row.allowed_ips) == (20, 1000, [], ["10.0.0.0/8"])
    updated = apikey_update(api_key=row, tpm=None, allowed_ips=None, budget_soft_percent=None)
    assert updated is row
    assert (row.rpm, row.tpm, row.allowed_ips, row.budget_soft_percent) == (20, None, None, None)
    assert ApiKey.objects.filter(pk=api_key.pk, tpm__isnull=True, allowed_ips__isnull=True).exists()
    tenant_update(tenant=tenant, concurrency=3, budget_tokens=5000)
    assert Tenant.objects.filter(pk=tenant.pk, concurrency=3, budget_tokens=5000).exists()


@pytest.mark.django_db
def test_fixed_window_rules() -> None:
    tenant = tenant_create(slug="acme")
    api_key, _ = apikey_create(tenant=tenant)
    start, end = T0, T0 + timedelta(days=10)
    with pytest.raises(ValidationError, match="needs both"):
        apikey_update(api_key=api_key, budget_period="fixed", budget_window_start=start)
    with pytest.raises(ValidationError, match="only used with"):
        apikey_update(api_key=api_key, budget_window_start=start, budget_window_end=end)
    with pytest.raises(ValidationError, match="after"):
        apikey_update(api_key=api_key, budget_period="fixed", budget_window_start=end, budget_window_end=start)
    apikey_update(api_key=api_key, budget_period="fixed", budget_window_start=start, budget_window_end=end)
    assert ApiKey.objects.get(pk=api_key.pk).budget_window_end == end
    # Back to a calendar period: the fixed window is cleared, not left dangling.
    apikey_update(api_key=api_key, budget_period="day")
    row = ApiKey.objects.get(pk=api_key.pk)
    assert (row.budget_period, row.budget_window_start, row.budget_window_end) == ("day", None, None)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("limits", "fragment"),
    [
        ({"rpm": 0}, "rpm must be a whole number"),
        ({"rpm": True}, "rpm"),
        ({"tpm": "10"}, "tpm"),
        ({"concurrency": 2**31}, "concurrency"),
        ({"budget_usd": 1.5}, "decimal number"),
        ({"budget_usd": "-1"}, "greater than 0"),
        ({"budget_usd": "0"}, "greater than 0"),
        ({"budget_usd": "1.1234567"}, "6 decimal places"),
        ({"budget_usd": "abc"}, "decimal number"),
        ({"budget_usd": "1e20"}, "too large"),
        ({"budget_usd": "NaN"}, "greater than 0"),
        ({"budget_period": "year"}, "budget_period must be one of"),
        ({"budget_soft_percent": 101}, "1 to 100"),
        ({"allowed_ips": ["10.0.0.0/33"]}, "not an IP address"),
        ({"allowed_ips": ["10.0.0.1", "nope"]}, "'nope'"),
        ({"allowed_ips": []}, "at least one"),
        ({"allowed_ips": "10.0.0.0/8"}, "list"),
        ({"reasoning_efforts": ["low", " "]}, "non-empty"),
        ({"max_output_tokens": -5}, "max_output_tokens"),
        ({"budget_window_start": datetime(2030, 1, 1)}, "timezone-aware"),
    ],
)
def test_update_validation_refuses_the_whole_change(limits: dict[str, Any], fragment: str) -> None:
    tenant = tenant_create(slug="acme")
    api_key, _ = apikey_create(tenant=tenant, rpm=7)
    with pytest.raises(ValidationError) as info:
        apikey_update(api_key=api_key, **({"rpm": 8} | limits))
    assert fragment in " ".join(info.value.messages)
    assert ApiKey.objects.get(pk=api_key.pk).rpm == 7
    with pytest.raises(ValidationError):
        apikey_create(tenant=tenant, **limits)
    assert ApiKey.objects.count() == 1


@pytest.mark.django_db
def test_tenant_limits_exclude_key_policy() -> None:
    tenant = tenant_create(slug="acme")
    key_only: dict[str, Any] = {"allowed_ips": ["10.0.0.0/8"]}
    with pytest.raises(ValidationError, match="unknown limit"):
        tenant_update(tenant=tenant, **key_only)
    with pytest.raises(ValidationError, match="unknown limit"):
        tenant_create(slug="other", **key_only)
    assert not Tenant.objects.filter(slug="other").exists()


@pytest.mark.django_db(transaction=True)
def test_limit_and_price_changes_are_announced(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(notify, "config_changed", lambda: calls.append(1))
    tenant = tenant_create(slug="acme")
    api_key, _ = apikey_create(tenant=tenant, rpm=5)
    assert len(calls) == 2
    apikey_update(api_key=api_key, rpm=6)
    assert len(calls) == 3
    apikey_update(api_key=api_key, rpm=6)  # no change: nothing saved, nothing announced
    tenant_update(tenant=tenant)
    assert len(calls) == 3
    tenant_update(tenant=tenant, rpm=100)
    assert len(calls) == 4
    price_set(model="gpt-a", input="1", cached_input="0.5", cache_write="1.25", output="4")
    assert len(calls) == 5


# --- prices --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_price_set_adds_versions() -> None:
    before = timezone.now()
    first = price_set(model=" gpt-a ", input="1.25", cached_input=Decimal("0.125"), cache_write=0, output="10")
    assert first.model == "gpt-a"
    assert first.effective_from >= before
    assert first.reasoning is None
    later = price_set(
        model="gpt-a", input="2", cached_input="1", cache_write="2.5", output="8", reasoning="12", effective_from=T0
    )
    assert PriceVersion.objects.count() == 2
    assert PriceVersion.objects.get(pk=later.pk).reasoning == Decimal("12")
    for bad in ({"input": "-1"}, {"output": 0.5}, {"model": " "}, {"effective_from": datetime(2030, 1, 1)}):
        args: dict[str, Any] = {"model": "gpt-a", "input": "1", "cached_input": "1", "cache_write": "1", "output": "1"}
        args.update(bad)
        with pytest.raises(ValidationError):
            price_set(**args)
    assert PriceVersion.objects.count() == 2


@pytest.mark.django_db
def test_prices_for_snapshot_in_one_query(django_assert_num_queries: Any) -> None:
    v1 = price_set(model="gpt-a", input="1", cached_input="0.5", cache_write="1.25", output="4", effective_from=T0)
    v0 = price_set(
        model="gpt-a", input="2", cached_input="1", cache_write="2", output="8", effective_from=T0 - timedelta(days=1)
    )
    other = price_set(model="gpt-b", input="3", cached_input="3", cache_write="3", output="3", reasoning="6")
    with django_assert_num_queries(1):
        rows = prices_for_snapshot()
    assert [row["id"] for row in rows] == [v0.pk, v1.pk, other.pk]
    assert rows[1] == {
        "id": v1.pk,
        "model": "gpt-a",
        "input": Decimal("1"),
        "cached_input": Decimal("0.5"),
        "cache_write": Decimal("1.25"),
        "output": Decimal("4"),
        "reasoning": None,
        "effective_from": T0,
    }
    assert rows[2]["reasoning"] == Decimal("6")


@pytest.mark.django_db
def test_apikeys_for_snapshot_carries_key_and_tenant_limits(django_assert_num_queries: Any) -> None:
    tenant = tenant_create(slug="acme", rpm=1000, tpm=10**6, concurrency=50, budget_usd="500", budget_tokens=10**8)
    window = {"budget_period": "fixed", "budget_window_start": T0, "budget_window_end": T0 + timedelta(days=7)}
    api_key, _ = apikey_create(
        tenant=tenant,
        allowed_models=["gpt-a"],
        rpm=60,
        max_output_tokens=512,
        reasoning_efforts=["low"],
        allowed_tools=["function"],
        allowed_ips=["192.168.0.0/16"],
        budget_usd="12.5",
        budget_soft_percent=75,
        **window,  # type: ignore[arg-type]
    )
    for _ in range(3):
        apikey_create(tenant=tenant)
    with django_assert_num_queries(1):
        rows = apikeys_for_snapshot()
    assert len(rows) == 4
    row = next(r for r in rows if r["id"] == api_key.pk)
    assert row == {
        # the fields the snapshot had before, unchanged
        "id": api_key.pk,
        "tenant_id": tenant.pk,
        "tenant_slug": "acme",
        "prefix": api_key.prefix,
        "digest": api_key.digest,
        "allowed_models": ["gpt-a"],
        "expires_at": None,
        # the key's limits and policy
        "rpm": 60,
        "tpm": None,
        "concurrency": None,
        "budget_usd": Decimal("12.5"),
        "budget_tokens": None,
        "budget_period": "fixed",
        "budget_window_start": T0,
        "budget_window_end": T0 + timedelta(days=7),
        "budget_soft_percent": 75,
        "max_output_tokens": 512,
        "reasoning_efforts": ["low"],
        "allowed_tools": ["function"],
        "allowed_ips": ["192.168.0.0/16"],
        "stateful": None,
        "tenant_stateful": False,
        # the tenant's limits
        "tenant_rpm": 1000,
        "tenant_tpm": 10**6,
        "tenant_concurrency": 50,
        "tenant_budget_usd": Decimal("500"),
        "tenant_budget_tokens": 10**8,
        "tenant_budget_period": "month",
        "tenant_budget_window_start": None,
        "tenant_budget_window_end": None,
        "tenant_budget_soft_percent": 80,
    }


# --- usage: cost, summaries, budgets --------------------------------------------------------


@pytest.mark.django_db
def test_usage_records_store_the_cost_the_gateway_computed() -> None:
    tenant = tenant_create(slug="acme")
    api_key, _ = apikey_create(tenant=tenant)
    version = price_set(model="gpt-a", input="1", cached_input="0.5", cache_write="1", output="4", effective_from=T0)
    usage_records_write(
        [
            _event("given", api_key, T0, cost="0.001234", price_version_id=version.pk),
            _event("unknown", api_key, T0, input_tokens=None, cost=None, price_version_id=None),
            _event("ghost-version", api_key, T0, cost="0.5", price_version_id=987654),
            _event("garbage", api_key, T0, cost="lots", price_version_id=version.pk),
            _event("huge", api_key, T0, cost="1e30", price_version_id=version.pk),
            _event("negative", api_key, T0, cost="-1", price_version_id=version.pk),
        ]
    )
    given = UsageRecord.objects.get(request_id="given")
    assert given.cost == Decimal("0.001234")
    assert given.price_version_id == version.pk
    unknown = UsageRecord.objects.get(request_id="unknown")
    assert (unknown.cost, unknown.price_version_id) == (None, None)
    ghost = UsageRecord.objects.get(request_id="ghost-version")
    assert (ghost.cost, ghost.price_version_id) == (Decimal("0.5"), None)
    for request_id in ("garbage", "huge", "negative"):  # recorded as unknown; never fails the batch
        assert UsageRecord.objects.get(request_id=request_id).cost is None


@pytest.mark.django_db
def test_usage_records_without_cost_are_priced_at_their_time() -> None:
    tenant = tenant_create(slug="acme")
    api_key, _ = apikey_create(tenant=tenant)
    old = price_set(model="gpt-a", input="1", cached_input="0.5", cache_write="1", output="4", effective_from=T0)
    new = price_set(
        model="gpt-a", input="2", cached_input="1", cache_write="2", output="8", effective_from=T0 + timedelta(days=1)
    )
    usage_records_write(
        [
            _event("before-any", api_key, T0 - timedelta(seconds=1)),
            _event("old", api_key, T0 + timedelta(hours=1)),
            _event("new", api_key, T0 + timedelta(days=2)),
            _event("no-price", api_key, T0 + timedelta(days=2), model="gpt-unpriced"),
            _event("no-usage", api_key, T0 + timedelta(days=2), output_tokens=None),
        ]
    )
    records = {r.request_id: r for r in UsageRecord.objects.all()}
    # 800 uncached * 1 + 200 cached * 0.5 + 60 visible * 4 + 40 reasoning * 4 = 1300 micro-USD
    assert (records["old"].cost, records["old"].price_version_id) == (Decimal("0.0013"), old.pk)
    assert (records["new"].cost, records["new"].price_version_id) == (Decimal("0.0026"), new.pk)
    for request_id in ("before-any", "no-price"):
        assert (records[request_id].cost, records[request_id].price_version_id) == (None, None)
    assert records["no-usage"].cost is None
    assert records["no-usage"].price_version_id == new.pk  # priced, but the tokens were unknown


@pytest.mark.django_db
def test_usage_summary_is_scoped_to_the_key(django_assert_num_queries: Any) -> None:
    owner = tenant_create(slug="owner")
    outsider = tenant_create(slug="outsider")
    key, _ = apikey_create(tenant=owner)
    sibling, _ = apikey_create(tenant=owner)
    stranger, _ = apikey_create(tenant=outsider)
    usage_records_write(
        [
            _event("k1", key, T0, cost="0.25"),
            _event("k2", key, T0 + timedelta(days=40), cost="0.5", cache_write_tokens=100),
            _event("k3", key, T0 + timedelta(days=41), input_tokens=None, total_tokens=None, cost=None),
            _event("s1", sibling, T0 + timedelta(days=40), cost="100"),
            _event("o1", stranger, T0 + timedelta(days=40), input_tokens=99_999, cost="999"),
        ]
    )
    with django_assert_num_queries(1):
        summary = usage_summary(key)
    assert summary == {
        "requests": 3,
        "input_tokens": 2000,  # k3's unknown input is skipped, not zero-filled
        "cached_tokens": 600,
        "cache_write_tokens": 100,
        "output_tokens": 300,
        "reasoning_tokens": 120,
        "total_tokens": 2200,
        "cost": Decimal("0.75"),
        "requests_with_unknown_usage": 1,
        "requests_with_unknown_cost": 1,
    }
    since = usage_summary(key.pk, T0 + timedelta(days=30))
    assert (since["requests"], since["cost"], since["input_tokens"]) == (2, Decimal("0.5"), 1000)
    empty = usage_summary(key, T0 + timedelta(days=365))
    assert empty["requests"] == 0
    assert empty["cost"] == Decimal(0)
    assert empty["total_tokens"] == 0


@pytest.mark.django_db
def test_budget_spent_by_key_and_tenant() -> None:
    tenant = tenant_create(slug="acme")
    key_a, _ = apikey_create(tenant=tenant)
    key_b, _ = apikey_create(tenant=tenant)
    other, _ = apikey_create(tenant=tenant_create(slug="other"))
    start, end = T0, T0 + timedelta(days=31)
    usage_records_write(
        [
            _event("a1", key_a, start, cost="1.5"),
            _event("a2", key_a, end - timedelta(microseconds=1), cost="0.25", total_tokens=None),
            _event("a3", key_a, end, cost="100"),  # the end is excluded
            _event("a0", key_a, start - timedelta(seconds=1), cost="100"),
            _event("b1", key_b, start + timedelta(days=1), cost=None),
            _event("o1", other, start + timedelta(days=1), cost="7"),
        ]
    )
    assert budget_spent("key", key_a.pk, start, end) == (1100, Decimal("1.75"))
    assert budget_spent("tenant", tenant.pk, start, end) == (2200, Decimal("1.75"))
    assert budget_spent("key", other.pk, end, end + timedelta(days=1)) == (0, Decimal(0))
    with pytest.raises(ValueError, match="scope"):
        budget_spent("pool", 1, start, end)
    # Many scopes at once (the batched budget seed) agree with one-by-one, in one query per 500 ids.
    many = budget_spent_many("key", [key_a.pk, key_b.pk, other.pk, 10**9], start, end)
    assert many == {
        key_a.pk: budget_spent("key", key_a.pk, start, end),
        key_b.pk: budget_spent("key", key_b.pk, start, end),
        other.pk: budget_spent("key", other.pk, start, end),
        10**9: (0, Decimal(0)),
    }
    assert budget_spent_many("tenant", [tenant.pk], start, end) == {tenant.pk: (2200, Decimal("1.75"))}
    with pytest.raises(ValueError, match="scope"):
        budget_spent_many("pool", [1], start, end)


@pytest.mark.django_db
def test_budget_spent_many_chunks_long_id_lists(django_assert_num_queries: Any) -> None:
    tenant = tenant_create(slug="many")
    key, _ = apikey_create(tenant=tenant)
    usage_records_write([_event("m1", key, T0, cost="0.5")])
    ids = [key.pk, *range(10**8, 10**8 + 1200)]
    with django_assert_num_queries(3):  # 1,201 ids: 500 + 500 + 201
        spent = budget_spent_many("key", ids, T0, T0 + timedelta(days=1))
    assert len(spent) == 1201
    assert spent[key.pk] == (1100, Decimal("0.5"))


# --- budget alerts ------------------------------------------------------------------------


class _Webhook:
    """A tiny local HTTP server recording what is POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status = 204
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                hook.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(hook.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret-token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[_Webhook]:
    hook = _Webhook()
    yield hook
    hook.close()


@pytest.fixture
def eager_celery() -> Iterator[None]:
    before = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = before


def _alert(tenant: Tenant, api_key: ApiKey, *, period_start: datetime = T0, kind: str = "soft") -> dict[str, Any]:
    return {
        "scope": "key",
        "scope_id": api_key.pk,
        "tenant_id": tenant.pk,
        "kind": kind,
        "metric": "usd",
        "period_start": period_start,
        "period_end": period_start + timedelta(days=31),
        "spent_usd": Decimal("8.5"),
        "limit_usd": Decimal("10"),
    }


@pytest.mark.django_db
def test_alert_delivered_to_webhook_once_per_period(
    webhook: _Webhook, eager_celery: None, django_capture_on_commit_callbacks: Any
) -> None:
    tenant = tenant_create(slug="acme")
    api_key, _ = apikey_create(tenant=tenant, budget_usd="10")
    with override_settings(GATEWAY_ALERT_WEBHOOK_URL=webhook.url):
        with django_capture_on_commit_callbacks(execute=True):
            alert, created = budget_alert_record(**_alert(tenant, api_key))
        assert created
        with django_capture_on_commit_callbacks(execute=True):
            again, created_again = budget_alert_record(**_alert(tenant, api_key) | {"spent_usd": Decimal("9.9")})
        assert not created_again
        assert again.pk == alert.pk
        # The same threshold in the next period, and the hard threshold, are alerts of their own.
        with django_capture_on_commit_callbacks(execute=True):
            budget_alert_record(**_alert(tenant, api_key, period_start=T0 + timedelta(days=31)))
            budget_alert_record(**_alert(tenant, api_key, kind="hard"))
    assert BudgetAlert.objects.count() == 3
    assert len(webhook.bodies) == 3
    body = webhook.bodies[0]
    assert body["type"] == "budget.alert"
    assert body["id"] == alert.pk
    assert (body["kind"], body["metric"], body["scope"]) == ("soft", "usd", "key")
    assert (body["tenant"], body["api_key_prefix"]) == ("acme", api_key.prefix)
    assert (body["spent_usd"], body["limit_usd"]) == ("8.5", "10")  # the spend when first crossed
    assert body["period_start"] == T0.isoformat()
    stored = BudgetAlert.objects.get(pk=alert.pk)
    assert stored.delivered_at is not None
    assert stored.attempts == 1
    assert stored.last_error == ""
    # Delivering again does nothing: the task is idempotent.
    with override_settings(GATEWAY_ALERT_WEBHOOK_URL=webhook.url):
        budget_alert_deliver_task.apply(args=(alert.pk,))
    assert len(webhook.bodies) == 3


@pytest.mark.django_db
def test_alert_without_webhook_is_only_recorded(django_capture_on_commit_callbacks: Any) -> None:
    tenant = tenant_create(slug="acme")
    api_key, _ = apikey_create(tenant=tenant)
    with override_settings(GATEWAY_ALERT_WEBHOOK_URL=""), django_capture_on_commit_callbacks() as callbacks:
        alert, created = budget_alert_record(**_alert(tenant, api_key))
    assert created
    assert callbacks == []
    assert alert.delivered_at is None
    with pytest.raises(ValidationError):
        budget_alert_record(**_alert(tenant, api_key) | {"kind": "medium"})


@pytest.mark.django_db
def test_alert_metric_is_inferred_when_not_given() -> None:
    tenant = tenant_create(slug="acme")
    api_key, _ = apikey_create(tenant=tenant)
    base = _alert(tenant, api_key) | {"metric": None, "limit_tokens": 1000}
    usd, _ = budget_alert_record(**base | {"spent_tokens": 100})  # 85 % of the money, 10 % of the tokens
    assert usd.metric == "usd"
    tokens, _ = budget_alert_record(**base | {"kind": "hard", "spent_tokens": 1000})
    assert tokens.metric == "tokens"
    later = T0 + timedelta(days=31)
    unknown, _ = budget_alert_record(
        **base | {"period_start": later, "limit_usd": None, "limit_tokens": None, "spent_usd": None}
    )
    assert unknown.metric == ""


@pytest.mark.django_db
def test_failed_delivery_records_the_error_without_the_url(webhook: _Webhook) -> None:
    tenant = tenant_create(slug="acme")
    api_key, _ = apikey_create(tenant=tenant)
    with override_settings(GATEWAY_ALERT_WEBHOOK_URL=""):
        alert, _ = budget_alert_record(**_alert(tenant, api_key))
    webhook.status = 500
    with pytest.raises(AlertDeliveryError):
        budget_alert_deliver(alert=alert, url=webhook.url)
    stored = BudgetAlert.objects.get(pk=alert.pk)
    assert (stored.delivered_at, stored.attempts, stored.last_error) == (None, 1, "webhook answered HTTP 500")
    # Nobody listening: the error names the host only (the URL may carry a token).
    closed = webhook.url.replace(str(webhook.server.server_address[1]), "1")
    with pytest.raises(AlertDeliveryError):
        budget_alert_deliver(alert=stored, url=closed)
    stored = BudgetAlert.objects.get(pk=alert.pk)
    assert stored.attempts == 2
    assert "127.0.0.1" in stored.last_error
    assert "secret-token" not in stored.last_error
    webhook.status = 200
    assert budget_alert_deliver(alert=stored, url=webhook.url) is True
    stored = BudgetAlert.objects.get(pk=alert.pk)
    assert stored.delivered_at is not None
    assert stored.last_error == ""


def test_alert_task_is_registered_in_every_process() -> None:
    """budget_alert_record queues the delivery by task name, without importing tenancy.tasks.

    A process that never imports the tasks (the gateway) must still know the name, or
    ``CELERY_TASK_ALWAYS_EAGER`` would not apply (an unknown name is sent to the broker).
    """
    code = (
        "import django; django.setup(); from celery import current_app; "
        f"print({BUDGET_ALERT_DELIVER_TASK!r} in current_app.tasks)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=harness.child_env(), capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "True"
    assert budget_alert_deliver_task.name == BUDGET_ALERT_DELIVER_TASK
