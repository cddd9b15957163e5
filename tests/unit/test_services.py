"""Services, selectors, key material, credential encryption and change notification."""

from __future__ import annotations

import asyncio
import hmac
import string
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import transaction
from django.utils import timezone

from accounts import crypto
from accounts.models import DEFAULT_STRIP_FIELDS, Pool, UpstreamAccount
from accounts.selectors import accounts_for_snapshot
from accounts.services import (
    pool_get_or_create,
    pool_set_strip_fields,
    upstream_account_create,
    upstream_account_set_enabled,
)
from gateway.config import notify
from tenancy.keys import generate_api_key, key_digest, key_prefix
from tenancy.models import ApiKey, Tenant, UsageRecord
from tenancy.selectors import apikeys_for_snapshot, tenant_get_by_slug
from tenancy.services.keys import apikey_create, apikey_revoke
from tenancy.services.tenants import tenant_create
from tenancy.services.usage import usage_records_write

BASE62 = set(string.ascii_letters + string.digits)


# --- key material -----------------------------------------------------------


def test_generated_key_shape() -> None:
    key, prefix = generate_api_key()
    assert len(key) == 56
    assert len(prefix) == 16
    assert key.startswith("sk-gw-")
    assert key[:16] == prefix
    assert set(key[6:]) <= BASE62
    assert generate_api_key()[0] != key


def test_key_prefix_checks_shape_only() -> None:
    key, prefix = generate_api_key()
    assert key_prefix(key) == prefix
    assert key_prefix(key[:-1]) is None
    assert key_prefix(key + "x") is None
    assert key_prefix("sk-xx-" + key[6:]) is None
    assert key_prefix(key[:-1] + "-") is None
    assert key_prefix(key[:-1] + "é") is None  # non-ASCII alphanumerics are refused
    assert key_prefix("") is None


def test_key_digest_is_hmac_under_secret_key(settings: Any) -> None:
    key, _ = generate_api_key()
    digest = key_digest(key)
    assert len(digest) == 64
    assert int(digest, 16) >= 0
    assert digest == key_digest(key)
    assert key not in digest
    settings.SECRET_KEY = "another-secret-key-that-is-long-enough-0123456789"
    assert not hmac.compare_digest(key_digest(key), digest)


def test_key_digest_refuses_empty_secret_key(settings: Any) -> None:
    settings.SECRET_KEY = ""
    with pytest.raises(ImproperlyConfigured):
        key_digest("sk-gw-whatever")


# --- tenants and keys --------------------------------------------------------


@pytest.mark.django_db
def test_tenant_create_and_get() -> None:
    tenant = tenant_create(slug="acme", name="Acme Inc")
    assert tenant.is_active
    assert tenant_get_by_slug("acme") == tenant
    assert tenant_create(slug="bare").name == "bare"
    with pytest.raises(Tenant.DoesNotExist):
        tenant_get_by_slug("nobody")


@pytest.mark.django_db
@pytest.mark.parametrize("slug", ["", "has space", "semi;colon", "x" * 65, "ünï"])
def test_tenant_create_rejects_bad_slug(slug: str) -> None:
    with pytest.raises(ValidationError):
        tenant_create(slug=slug)


@pytest.mark.django_db
def test_tenant_create_rejects_duplicate() -> None:
    tenant_create(slug="acme")
    with pytest.raises(ValidationError):
        tenant_create(slug="acme")
    assert Tenant.objects.count() == 1


@pytest.mark.django_db
def test_apikey_row_holds_no_secret() -> None:
    tenant = tenant_create(slug="acme")
    api_key, secret = apikey_create(tenant=tenant, name="ci")
    row = ApiKey.objects.filter(pk=api_key.pk).values().get()
    assert row["prefix"] == secret[:16]
    assert row["digest"] == key_digest(secret)
    assert row["digest"] != secret
    for value in row.values():
        assert secret not in str(value)
        assert secret[16:] not in str(value)


@pytest.mark.django_db
def test_apikey_create_options() -> None:
    tenant = tenant_create(slug="acme")
    expires = timezone.now() + timedelta(days=3)
    api_key, _ = apikey_create(tenant=tenant, allowed_models=[" gpt-a", "gpt-b", "gpt-a"], expires_at=expires)
    assert api_key.allowed_models == ["gpt-a", "gpt-b"]
    assert api_key.expires_at == expires
    with pytest.raises(ValidationError):
        apikey_create(tenant=tenant, expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(ValidationError):
        apikey_create(tenant=tenant, expires_at=datetime(2999, 1, 1))  # naive
    with pytest.raises(ValidationError):
        apikey_create(tenant=tenant, allowed_models=["ok", ""])
    with pytest.raises(ValidationError):
        apikey_create(tenant=tenant, allowed_models="gpt-a")


@pytest.mark.django_db
def test_apikey_revoke_is_idempotent_and_leaves_snapshot() -> None:
    tenant = tenant_create(slug="acme")
    api_key, _ = apikey_create(tenant=tenant)
    assert [row["id"] for row in apikeys_for_snapshot()] == [api_key.pk]
    apikey_revoke(api_key=api_key)
    first = ApiKey.objects.get(pk=api_key.pk).revoked_at
    assert first is not None
    apikey_revoke(api_key=ApiKey.objects.get(pk=api_key.pk))
    assert ApiKey.objects.get(pk=api_key.pk).revoked_at == first
    assert apikeys_for_snapshot() == []


@pytest.mark.django_db
def test_apikeys_for_snapshot_in_one_query(django_assert_num_queries: Any) -> None:
    acme = tenant_create(slug="acme")
    gone = tenant_create(slug="gone")
    gone.is_active = False
    gone.save()
    live, _ = apikey_create(tenant=acme, allowed_models=["gpt-a"])
    expiring, _ = apikey_create(tenant=acme, expires_at=timezone.now() + timedelta(days=1))
    ApiKey.objects.filter(pk=expiring.pk).update(expires_at=timezone.now() - timedelta(days=1))
    revoked, _ = apikey_create(tenant=acme)
    apikey_revoke(api_key=revoked)
    apikey_create(tenant=gone)
    for _ in range(5):
        apikey_create(tenant=acme)

    with django_assert_num_queries(1):
        rows = apikeys_for_snapshot()

    by_id = {row["id"]: row for row in rows}
    assert revoked.pk not in by_id
    assert all(row["tenant_slug"] == "acme" for row in rows)
    assert len(rows) == 7
    # Expired keys stay in the snapshot with their expiry: the gateway checks per request.
    assert by_id[expiring.pk]["expires_at"] < timezone.now()
    base_fields = ("id", "tenant_id", "tenant_slug", "prefix", "digest", "allowed_models", "expires_at")
    assert {k: by_id[live.pk][k] for k in base_fields} == {
        "id": live.pk,
        "tenant_id": acme.pk,
        "tenant_slug": "acme",
        "prefix": live.prefix,
        "digest": live.digest,
        "allowed_models": ["gpt-a"],
        "expires_at": None,
    }


# --- usage -----------------------------------------------------------------------


def _event(request_id: str, tenant: Tenant, api_key: ApiKey | None, created_at: datetime | str, **extra: Any) -> dict:
    event = {
        "request_id": request_id,
        "tenant_id": tenant.pk,
        "api_key_id": api_key.pk if api_key else None,
        "account_id": None,
        "model": "gpt-a",
        "status_code": 200,
        "outcome": "completed",
        "stream": False,
        "response_id": "resp_1",
        "input_tokens": 10,
        "cached_tokens": None,
        "cache_write_tokens": None,
        "output_tokens": 5,
        "reasoning_tokens": None,
        "total_tokens": 15,
        "latency_ms": 12.5,
        "ttfb_ms": None,
        "created_at": created_at,
    }
    event.update(extra)
    return event


@pytest.mark.django_db
def test_usage_records_write_is_idempotent_and_bumps_last_used(django_capture_on_commit_callbacks: Any) -> None:
    tenant = tenant_create(slug="acme")
    key_a, _ = apikey_create(tenant=tenant)
    key_b, _ = apikey_create(tenant=tenant)
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    events = [
        _event("r1", tenant, key_a, t0),
        _event("r2", tenant, key_a, t0 + timedelta(seconds=5)),
        _event("r3", tenant, key_b, t0 + timedelta(seconds=2), stream=True, ttfb_ms=3.0),
        _event("r4", tenant, None, t0 + timedelta(seconds=9)),
    ]
    with django_capture_on_commit_callbacks() as callbacks:
        assert usage_records_write(events) == 4
        assert usage_records_write(events) == 4  # replay: attempted, nothing new
    # last_used_at goes through queryset.update(): no signal, so no config reload.
    assert callbacks == []
    assert UsageRecord.objects.count() == 4
    assert ApiKey.objects.get(pk=key_a.pk).last_used_at == t0 + timedelta(seconds=5)
    assert ApiKey.objects.get(pk=key_b.pk).last_used_at == t0 + timedelta(seconds=2)
    record = UsageRecord.objects.get(request_id="r3")
    assert record.stream is True
    assert record.ttfb_ms == 3.0
    assert record.cached_tokens is None  # unknown is not zero
    # An older event never moves last_used_at backwards.
    usage_records_write([_event("r5", tenant, key_a, t0 - timedelta(days=1))])
    assert ApiKey.objects.get(pk=key_a.pk).last_used_at == t0 + timedelta(seconds=5)
    assert usage_records_write([]) == 0


@pytest.mark.django_db
def test_usage_records_write_survives_deleted_rows() -> None:
    tenant = tenant_create(slug="acme")
    api_key, _ = apikey_create(tenant=tenant)
    ghost_key_id = api_key.pk
    api_key.delete()
    now = timezone.now()
    events = [
        _event("k1", tenant, None, now, api_key_id=ghost_key_id, account_id=987654),
        _event("k2", tenant, None, now, tenant_id=987654),
        _event("k3", tenant, None, now.isoformat()),  # spooled events come back as strings
    ]
    assert usage_records_write(events) == 2
    record = UsageRecord.objects.get(request_id="k1")
    assert record.api_key_id is None
    assert record.account_id is None
    assert not UsageRecord.objects.filter(request_id="k2").exists()
    assert UsageRecord.objects.get(request_id="k3").created_at == now


# --- credentials -------------------------------------------------------------------


def test_credential_round_trip_and_wrong_key(settings: Any) -> None:
    token = crypto.encrypt_credential("sk-upstream-plain")
    assert "sk-upstream-plain" not in token
    assert crypto.decrypt_credential(token) == "sk-upstream-plain"
    settings.GATEWAY_ENCRYPTION_KEY = Fernet.generate_key().decode()
    with pytest.raises(crypto.CredentialDecryptError) as info:
        crypto.decrypt_credential(token)
    assert "sk-upstream-plain" not in str(info.value)
    assert settings.GATEWAY_ENCRYPTION_KEY not in str(info.value)


def test_credential_invalid_key_message_hides_key(settings: Any) -> None:
    settings.GATEWAY_ENCRYPTION_KEY = "not-a-fernet-key-but-secret-ish"
    with pytest.raises(ImproperlyConfigured) as info:
        crypto.encrypt_credential("x")
    assert "not-a-fernet-key" not in str(info.value)
    assert info.value.__cause__ is None
    assert crypto.is_valid_encryption_key(crypto.generate_encryption_key())
    assert not crypto.is_valid_encryption_key("short")


# --- pools and accounts ----------------------------------------------------------------


@pytest.mark.django_db
def test_pool_get_or_create() -> None:
    pool = pool_get_or_create(name="main")
    assert pool_get_or_create(name="main") == pool
    assert Pool.objects.count() == 1
    with pytest.raises(ValidationError):
        pool_get_or_create(name="not a slug")


@pytest.mark.django_db
def test_upstream_account_create_encrypts_and_normalizes() -> None:
    pool = pool_get_or_create(name="main")
    account = upstream_account_create(
        pool=pool, base_url="https://api.example.com/v1/", api_key="sk-upstream-plain", models=["gpt-a", "gpt-a"]
    )
    stored = UpstreamAccount.objects.filter(pk=account.pk).values().get()
    assert stored["base_url"] == "https://api.example.com/v1"
    assert stored["models"] == ["gpt-a"]
    assert stored["credential_encrypted"]
    assert stored["credential_encrypted"] != "sk-upstream-plain"
    assert "sk-upstream-plain" not in str(stored)
    assert crypto.decrypt_credential(stored["credential_encrypted"]) == "sk-upstream-plain"
    # Single-label hosts (docker-compose service names) are fine; no key is fine.
    keyless = upstream_account_create(pool=pool, base_url="http://upstream:8080/v1", models=["gpt-a"])
    assert keyless.credential_encrypted == ""


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"base_url": "ftp://example.com/v1"}, "http"),
        ({"base_url": "not a url"}, "http"),
        ({"base_url": "https://"}, "host"),
        ({"base_url": "https://api.example.com/v1/responses"}, "/responses"),
        ({"base_url": "https://api.example.com:99999/v1"}, "malformed"),
        ({"models": []}, "at least one model"),
        ({"models": ["gpt-a", " "]}, "non-empty"),
        ({"weight": 0}, "weight"),
    ],
)
def test_upstream_account_create_validation(kwargs: dict[str, Any], fragment: str) -> None:
    pool = pool_get_or_create(name="main")
    args: dict[str, Any] = {"base_url": "https://api.example.com/v1", "models": ["gpt-a"], "api_key": "sk-hidden"}
    args.update(kwargs)
    with pytest.raises(ValidationError) as info:
        upstream_account_create(pool=pool, **args)
    message = " ".join(info.value.messages)
    assert fragment in message
    assert "sk-hidden" not in message
    assert UpstreamAccount.objects.count() == 0


@pytest.mark.django_db
def test_pool_set_strip_fields() -> None:
    pool = pool_get_or_create(name="main")
    assert pool.effective_strip_fields() == DEFAULT_STRIP_FIELDS
    pool_set_strip_fields(pool=pool, fields=["temperature", "temperature"])
    assert Pool.objects.get(pk=pool.pk).strip_fields == ["temperature"]
    pool_set_strip_fields(pool=pool, fields=[])
    assert Pool.objects.get(pk=pool.pk).effective_strip_fields() == []
    with pytest.raises(ValidationError):
        pool_set_strip_fields(pool=pool, fields=["model"])
    pool_set_strip_fields(pool=pool, fields=None)
    assert Pool.objects.get(pk=pool.pk).strip_fields is None


@pytest.mark.django_db
def test_accounts_for_snapshot(django_assert_num_queries: Any, settings: Any) -> None:
    main = pool_get_or_create(name="main")
    narrow = pool_get_or_create(name="narrow")
    pool_set_strip_fields(pool=narrow, fields=["temperature"])
    a = upstream_account_create(pool=main, base_url="https://a.example/v1", api_key="sk-a", models=["m1"], weight=3)
    b = upstream_account_create(pool=narrow, base_url="https://b.example/v1", models=["m2"])
    off = upstream_account_create(pool=main, base_url="https://c.example/v1", api_key="sk-c", models=["m3"])
    upstream_account_set_enabled(account=off, enabled=False)

    with django_assert_num_queries(1):
        rows = accounts_for_snapshot()

    by_id = {row["id"]: row for row in rows}
    assert by_id[a.pk]["credential"] == "sk-a"
    assert by_id[a.pk]["pool_name"] == "main"
    assert by_id[a.pk]["pool_id"] == main.pk
    assert by_id[a.pk]["weight"] == 3
    assert by_id[a.pk]["models"] == ["m1"]
    assert by_id[a.pk]["provider"] == "openai"
    assert by_id[a.pk]["base_url"] == "https://a.example/v1"
    assert by_id[a.pk]["strip_fields"] == DEFAULT_STRIP_FIELDS
    assert by_id[a.pk]["enabled"] is True
    assert by_id[b.pk]["credential"] is None
    assert by_id[b.pk]["strip_fields"] == ["temperature"]
    # Disabled accounts are listed (503, not 404, for their models) but never decrypted.
    assert by_id[off.pk]["enabled"] is False
    assert by_id[off.pk]["credential"] is None

    # Under another encryption key the credential cannot be read: the account drops out.
    settings.GATEWAY_ENCRYPTION_KEY = Fernet.generate_key().decode()
    row = next(r for r in accounts_for_snapshot() if r["id"] == a.pk)
    assert row["enabled"] is False
    assert row["credential"] is None


# --- change notification ------------------------------------------------------------------


@pytest.fixture
def embedded(settings: Any, tmp_path: Path) -> Path:
    settings.REDIS_URL = ""
    settings.DATA_DIR = tmp_path / "data"  # does not exist yet: config_changed creates it
    return settings.DATA_DIR / "config.gen"


def test_config_changed_moves_the_token(embedded: Path) -> None:
    assert notify.config_token() is None
    notify.config_changed()
    first = notify.config_token()
    assert first is not None
    assert embedded.exists()
    notify.config_changed()
    second = notify.config_token()
    assert second != first
    assert notify.config_token() == second  # stable while nothing changes
    assert list(embedded.parent.iterdir()) == [embedded]  # no temp files left behind


def test_config_token_async_embedded(embedded: Path) -> None:
    notify.config_changed()
    assert asyncio.run(notify.config_token_async(None)) == notify.config_token()


class FakeRedis:
    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.published: list[tuple[str, str]] = []

    def incr(self, key: str) -> int:
        self.values[key] = self.values.get(key, 0) + 1
        return self.values[key]

    def publish(self, channel: str, message: str) -> int:
        self.published.append((channel, message))
        return 1

    def get(self, key: str) -> bytes | None:
        value = self.values.get(key)
        return None if value is None else str(value).encode()


class FakeAsyncRedis:
    def __init__(self, sync: FakeRedis) -> None:
        self.sync = sync

    async def get(self, key: str) -> bytes | None:
        return self.sync.get(key)


def test_config_changed_redis_mode(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:6379/0"
    fake = FakeRedis()
    monkeypatch.setattr(notify, "_redis", lambda: fake)
    assert notify.config_token() is None
    notify.config_changed()
    notify.config_changed()
    assert notify.config_token() == b"2"
    assert fake.published == [("gw:config", "1"), ("gw:config", "2")]
    assert asyncio.run(notify.config_token_async(FakeAsyncRedis(fake))) == b"2"  # type: ignore[arg-type]


@pytest.mark.django_db(transaction=True)
def test_config_writes_announce_after_commit(embedded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = pool_get_or_create(name="main")
    account = upstream_account_create(pool=pool, base_url="https://a.example/v1", models=["m"])
    before = notify.config_token()
    assert before is not None
    upstream_account_set_enabled(account=account, enabled=False)
    assert notify.config_token() != before

    calls: list[int] = []
    monkeypatch.setattr(notify, "config_changed", lambda: calls.append(1))
    tenant = tenant_create(slug="acme")
    assert len(calls) == 1
    for _ in range(3):
        apikey_create(tenant=tenant)
    assert len(calls) == 4
    # Usage and last_used_at bumps are not configuration: no announcement.
    other = tenant_create(slug="other")
    other_key, _ = apikey_create(tenant=other)
    assert len(calls) == 6
    usage_records_write([_event("u1", other, other_key, timezone.now())])
    assert len(calls) == 6
    # A rolled-back write announces nothing and leaves nothing pending.
    try:
        with transaction.atomic():
            tenant_create(slug="never")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    assert not Tenant.objects.filter(slug="never").exists()
    assert len(calls) == 6
    # A cascade (tenant + 3 keys) in one transaction is announced once.
    tenant.delete()
    assert len(calls) == 7


@pytest.mark.django_db
def test_key_writes_enter_the_change_feed_and_a_key_is_read_alone_in_one_query(
    django_assert_num_queries: Any,
) -> None:
    from tenancy.selectors import (
        apikey_prefixes,
        apikeys_for_snapshot_by_prefix,
        config_change_last,
        config_changes_since,
    )

    start = config_change_last()
    tenant = tenant_create(slug="acme")
    api_key, _ = apikey_create(tenant=tenant)
    with django_assert_num_queries(1):
        found = apikeys_for_snapshot_by_prefix([api_key.prefix]).get(api_key.prefix)
    assert found is not None
    assert found == next(r for r in apikeys_for_snapshot() if r["id"] == api_key.pk)
    apikey_revoke(api_key=api_key)
    assert apikeys_for_snapshot_by_prefix([api_key.prefix]) == {}
    assert api_key.prefix in set(apikey_prefixes())  # membership keeps revoked prefixes
    changes = config_changes_since(start, 100)
    assert [(c["kind"], c["prefix"]) for c in changes] == [
        ("tenant", ""),
        ("key", api_key.prefix),
        ("key", api_key.prefix),
    ]
    assert changes[0]["tenant_id"] == tenant.pk
    assert config_change_last() == changes[-1]["id"]
