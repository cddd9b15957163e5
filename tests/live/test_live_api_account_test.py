"""``POST /api/v1/accounts/{id}/test/`` against a live gateway: the probe goes over real HTTP
to the shipped fake upstream, with the account's credential, and the answer says what it found."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests

from tests import harness as live
from tests.conftest import MODEL, FakeUpstream

pytestmark = pytest.mark.live

SECRET = "sk-upstream-live-probe-5d1c"


def test_an_operator_probes_an_account_through_a_live_gateway(
    transactional_db: None, start_gateway: Callable[..., live.LiveProcess], fake_upstream: FakeUpstream
) -> None:
    from django.contrib.auth.models import User

    from accounts.services import pool_get_or_create, upstream_account_create
    from tenancy.models import AuditEntry
    from tenancy.services.tokens import access_token_create

    account = upstream_account_create(
        pool=pool_get_or_create(name="main"), base_url=fake_upstream.base_url, api_key=SECRET, models=[MODEL]
    )
    _, token = access_token_create(user=User.objects.create_user("operator", is_staff=True), name="t")
    gateway = start_gateway()
    fake_upstream.reset()
    answer = requests.post(
        f"{gateway.url}/api/v1/accounts/{account.pk}/test/", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == 200
    assert answer.json()["verdict"] == "success"
    assert answer.json()["error"] == ""
    assert SECRET not in answer.text
    sent = fake_upstream.last_request()
    assert sent["body"]["model"] == MODEL
    assert sent["headers"]["authorization"] == f"Bearer {SECRET}"
    entry = AuditEntry.objects.get(action="account.test")
    assert entry.after == {"status": 200, "verdict": "success", "error": ""}
