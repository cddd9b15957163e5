"""The supply side's endpoints: pools, upstream accounts (the credential write-only), routes."""

from __future__ import annotations

import httpx
import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from rest_framework.test import APIClient

from accounts.crypto import decrypt_credential
from accounts.infra.audit import SECRET_CHANGED
from accounts.models import ModelRoute, UpstreamAccount
from accounts.services import upstream_account_set_enabled
from accounts.upstream.client import UpstreamReply
from tenancy.models import AuditEntry
from tenancy.services.tokens import access_token_create

pytestmark = pytest.mark.django_db

SECRET = "sk-upstream-do-not-show-1234567890"
NEW_SECRET = "sk-upstream-rotated-0987654321"


@pytest.fixture
def operator() -> APIClient:
    cache.clear()
    _, token = access_token_create(user=User.objects.create_user("ops", is_staff=True), name="t")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def test_the_credential_is_write_only_and_its_change_audited_without_a_value(operator: APIClient) -> None:
    body = {"pool": "main", "base_url": "http://127.0.0.1:9/v1", "models": ["gpt-4.1"], "api_key": SECRET}
    created = operator.post("/api/v1/accounts/", body, format="json")
    assert created.status_code == 201
    account_id = created.json()["id"]
    assert created.json()["credential_set"] is True
    assert created.json()["health"]["state"] == "healthy"
    changed = operator.patch(f"/api/v1/accounts/{account_id}/", {"api_key": NEW_SECRET, "weight": 2}, format="json")
    assert changed.status_code == 200
    assert decrypt_credential(UpstreamAccount.objects.get(pk=account_id).credential_encrypted) == NEW_SECRET
    answers = [created, changed, operator.get(f"/api/v1/accounts/{account_id}/"), operator.get("/api/v1/accounts/")]
    audit = operator.get("/api/v1/audit/?target_type=upstreamaccount")
    for answer in [*answers, audit]:
        text = answer.content.decode()
        assert SECRET not in text
        assert NEW_SECRET not in text
        assert "credential_encrypted" not in text
    update = AuditEntry.objects.get(action="account.update")
    assert update.after == {"weight": 2, "credential": SECRET_CHANGED}
    assert update.before == {"weight": 1, "credential": "[secret]"}
    create = AuditEntry.objects.get(action="account.create")
    assert create.after is not None
    assert create.after["credential"] == SECRET_CHANGED
    assert SECRET not in str(create.after)


def test_disabling_shows_in_health_and_transitions(operator: APIClient) -> None:
    body = {"pool": "main", "base_url": "http://127.0.0.1:9/v1", "models": ["gpt-4.1"]}
    account_id = operator.post("/api/v1/accounts/", body, format="json").json()["id"]
    off = operator.patch(
        f"/api/v1/accounts/{account_id}/", {"enabled": False, "disabled_reason": "maintenance"}, format="json"
    )
    assert off.status_code == 200
    assert off.json()["enabled"] is False
    assert off.json()["disabled_reason"] == "maintenance"
    history = operator.get(f"/api/v1/accounts/{account_id}/transitions/").json()["results"]
    assert history[0]["to_state"] == "disabled"
    assert "maintenance" in history[0]["reason"]
    upstream_account_set_enabled(account=UpstreamAccount.objects.get(pk=account_id), enabled=True)
    listed = operator.get("/api/v1/accounts/?pool=main&enabled=true").json()["results"]
    assert [a["id"] for a in listed] == [account_id]
    assert listed[0]["health"]["state"] == "healthy"
    assert operator.get("/api/v1/accounts/?pool=other").json()["results"] == []


def test_bad_input_is_a_400_never_a_500(operator: APIClient) -> None:
    bad_url = {"pool": "main", "base_url": "ftp://nowhere", "models": ["m"]}
    assert operator.post("/api/v1/accounts/", bad_url, format="json").status_code == 400
    assert operator.post("/api/v1/accounts/", {"pool": "main"}, format="json").status_code == 400
    assert operator.post("/api/v1/pools/", {"name": "not a slug"}, format="json").status_code == 400
    unknown_pool = {"model": "alias", "targets": [{"pool": "nope", "upstream_model": "m"}]}
    refused = operator.post("/api/v1/routes/", unknown_pool, format="json")
    assert refused.status_code == 400
    assert "unknown pool" in refused.json()["detail"]


def test_routes_are_replaced_and_deleted_with_an_audit_trail(operator: APIClient) -> None:
    operator.post("/api/v1/pools/", {"name": "main"}, format="json")
    operator.post("/api/v1/pools/", {"name": "backup", "strategy": "fill_first"}, format="json")
    first = {"model": "smart", "targets": [{"pool": "main", "upstream_model": "gpt-4.1"}]}
    route_id = operator.post("/api/v1/routes/", first, format="json").json()["id"]
    both = {"model": "smart", "targets": [*first["targets"], {"pool": "backup", "upstream_model": "gpt-4.1-mini"}]}
    again = operator.post("/api/v1/routes/", both, format="json").json()
    assert again["id"] == route_id
    assert [t["pool"] for t in again["targets"]] == ["main", "backup"]
    assert operator.delete(f"/api/v1/routes/{route_id}/").status_code == 204
    assert not ModelRoute.objects.exists()
    actions = list(AuditEntry.objects.filter(target_type="modelroute").values_list("action", "after"))
    assert actions[1] == ("route.set", {"targets": ["main:gpt-4.1", "backup:gpt-4.1-mini"]})
    assert actions[2] == ("route.delete", None)


class _StubUpstream:
    """Stands in for the probe's UpstreamClient (the outbound-HTTP seam): records what was sent."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.sent: list[tuple[str, dict[str, str], bytes]] = []

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> UpstreamReply:
        self.sent.append((url, dict(headers), body))
        return UpstreamReply(self.status, httpx.Headers({"content-type": "application/json"}), b"{}")

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize(("status", "verdict", "error"), [(200, "success", ""), (401, "auth_failure", "http_401")])
def test_the_test_action_probes_the_account_now_and_is_audited(
    operator: APIClient, monkeypatch: pytest.MonkeyPatch, status: int, verdict: str, error: str
) -> None:
    stub = _StubUpstream(status)
    monkeypatch.setattr("accounts.services.probe_client", lambda: stub)
    body = {"pool": "main", "base_url": "http://upstream.test/v1", "models": ["gpt-4.1"], "api_key": SECRET}
    account_id = operator.post("/api/v1/accounts/", body, format="json").json()["id"]
    answer = operator.post(f"/api/v1/accounts/{account_id}/test/")
    assert answer.status_code == 200
    assert answer.json()["status"] == status
    assert answer.json()["verdict"] == verdict
    assert answer.json()["error"] == error
    assert answer.json()["latency_ms"] >= 0
    assert SECRET not in answer.content.decode()
    [(url, headers, sent)] = stub.sent
    assert url == "http://upstream.test/v1/responses"
    assert headers["authorization"] == f"Bearer {SECRET}"
    assert b'"model":"gpt-4.1"' in sent
    entry = AuditEntry.objects.get(action="account.test")
    assert entry.after == {"status": status, "verdict": verdict, "error": error}
    assert SECRET not in str(entry.after)


def test_the_test_action_without_an_answer_says_so(operator: APIClient) -> None:
    body = {"pool": "main", "base_url": "http://127.0.0.1:9/v1", "models": ["gpt-4.1"]}
    account_id = operator.post("/api/v1/accounts/", body, format="json").json()["id"]
    answer = operator.post(f"/api/v1/accounts/{account_id}/test/")
    assert answer.status_code == 200
    assert answer.json()["status"] is None
    assert answer.json()["error"] == "no_answer"


def test_a_tenant_admin_cannot_probe(operator: APIClient) -> None:
    body = {"pool": "main", "base_url": "http://127.0.0.1:9/v1", "models": ["gpt-4.1"]}
    account_id = operator.post("/api/v1/accounts/", body, format="json").json()["id"]
    _, token = access_token_create(user=User.objects.create_user("someone"), name="t")
    client = APIClient()
    assert client.post(f"/api/v1/accounts/{account_id}/test/").status_code == 401
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    assert client.post(f"/api/v1/accounts/{account_id}/test/").status_code == 403
    assert not AuditEntry.objects.filter(action="account.test").exists()


def test_a_pool_is_deleted_only_when_empty(operator: APIClient) -> None:
    body = {"pool": "busy", "base_url": "http://127.0.0.1:9/v1", "models": ["gpt-4.1"]}
    account_id = operator.post("/api/v1/accounts/", body, format="json").json()["id"]
    busy = UpstreamAccount.objects.get(pk=account_id).pool_id
    refused = operator.delete(f"/api/v1/pools/{busy}/")
    assert refused.status_code == 400
    assert "1 account(s)" in refused.content.decode()
    empty = operator.post("/api/v1/pools/", {"name": "empty"}, format="json").json()["id"]
    assert operator.delete(f"/api/v1/pools/{empty}/").status_code == 204
    assert operator.get(f"/api/v1/pools/{empty}/").status_code == 404
    assert AuditEntry.objects.filter(action="pool.delete", target_label="empty").exists()
    assert operator.get(f"/api/v1/pools/{busy}/").status_code == 200


def test_prices_add_versions_and_read_the_history(operator: APIClient) -> None:
    first = {"model": "gpt-4.1", "input": "2", "cached_input": "0.5", "cache_write": "2", "output": "8"}
    later = dict(first, input="3", effective_from="2030-01-01T00:00:00Z")
    assert operator.post("/api/v1/prices/", first, format="json").status_code == 201
    added = operator.post("/api/v1/prices/", later, format="json")
    assert added.status_code == 201
    assert added.json()["input"] == "3.000000"
    history = operator.get("/api/v1/prices/?model=gpt-4.1").json()["results"]
    assert [row["input"] for row in history] == ["3.000000", "2.000000"]
    assert operator.get("/api/v1/prices/?model=other").json()["results"] == []
    bad = operator.post("/api/v1/prices/", dict(first, input="-1", output="x"), format="json")
    assert bad.status_code == 400
    assert set(bad.json()) >= {"input", "output"}
    entry = AuditEntry.objects.filter(action="price.set").latest("id")
    assert entry.after is not None
    assert entry.after["input"] == "3.000000"
