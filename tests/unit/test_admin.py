"""The admin of both rooms: actions go through the services; records and logs are read-only."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from accounts.models import AccountTransition, UpstreamAccount
from accounts.services import pool_get_or_create, upstream_account_create
from tenancy.models import ApiKey
from tenancy.services.keys import apikey_create
from tenancy.services.prices import price_set
from tenancy.services.tenants import tenant_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def account() -> UpstreamAccount:
    pool = pool_get_or_create(name="main")
    return upstream_account_create(pool=pool, base_url="http://127.0.0.1:9/v1", models=["gpt-a"])


def _act(client: Client, url: str, action: str, *ids: int) -> None:
    response = client.post(url, {"action": action, "_selected_action": [str(pk) for pk in ids]})
    assert response.status_code == 302, response.content[:500]


def test_account_actions_enable_and_disable_through_the_service(admin_client: Client, account: Any) -> None:
    url = "/admin/accounts/upstreamaccount/"
    _act(admin_client, url, "disable_accounts", account.pk)
    account.refresh_from_db()
    assert not account.enabled
    _act(admin_client, url, "enable_accounts", account.pk)
    account.refresh_from_db()
    assert account.enabled
    # The service logged both switches; the admin shows the log but cannot add to it or edit it.
    log = list(AccountTransition.objects.order_by("at", "pk").values_list("to_state", "reason"))
    assert log == [("disabled", "disabled by operator"), ("healthy", "enabled by operator")]
    assert admin_client.get("/admin/accounts/accounttransition/add/").status_code == 403
    row = AccountTransition.objects.first()
    assert row is not None
    page = admin_client.get(f"/admin/accounts/accounttransition/{row.pk}/change/")
    assert page.status_code == 200
    assert b'name="_save"' not in page.content  # shown, not editable


def test_key_revocation_and_read_only_tenancy_tables(admin_client: Client) -> None:
    tenant = tenant_create(slug="acme")
    first, _ = apikey_create(tenant=tenant)
    apikey_create(tenant=tenant)  # not selected: stays valid
    _act(admin_client, "/admin/tenancy/apikey/", "revoke_keys", first.pk)
    assert list(ApiKey.objects.filter(revoked_at__isnull=False).values_list("pk", flat=True)) == [first.pk]
    # Keys are created by apikey_create only (the secret is shown once there).
    assert admin_client.get("/admin/tenancy/apikey/add/").status_code == 403
    # Usage records and alerts are written by the system: neither added nor edited here.
    assert admin_client.get("/admin/tenancy/usagerecord/add/").status_code == 403
    assert admin_client.get("/admin/tenancy/budgetalert/add/").status_code == 403
    # Price versions may be added but never edited: billed records point at them.
    price = price_set(model="gpt-a", input="1", cached_input="0.5", cache_write="1.25", output="4")
    assert admin_client.get("/admin/tenancy/priceversion/add/").status_code == 200
    page = admin_client.get(f"/admin/tenancy/priceversion/{price.pk}/change/")
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
