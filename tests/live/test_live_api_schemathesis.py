"""Schemathesis against a live gateway (issue 12): the management API's schema, as served at
``/api/schema/``, drives generated requests over real HTTP, once with an operator's token and
once with a tenant admin's.

Every answer must: not be a server error; match the schema's response body and content type
when its status is documented; and never contain a credential: the upstream account's API key,
a data-plane key's secret or an access token (a create answer shows only the new secret it
makes, never one of these). Each operation gets a bounded number of examples (``EXAMPLES``)
so the whole run stays well under two minutes on two cores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance
from schemathesis.core.result import Err, Ok

from tests import harness as live
from tests.conftest import MODEL

pytestmark = pytest.mark.live

EXAMPLES = 12  # per operation and caller
UPSTREAM_SECRET = "sk-upstream-schemathesis-credential-7f3a"
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
# Generous throttles: the run makes hundreds of requests from one address in seconds.
UNTHROTTLED = {
    "GATEWAY_API_USER_RATE": "100000/min",
    "GATEWAY_API_ANON_RATE": "100000/min",
    "GATEWAY_API_AUTH_FAILURES": "100000",
}


@dataclass
class Seeded:
    url: str
    secrets: dict[str, str]  # what must never appear in an answer, by name (tokens join as issued)
    fresh_token: Callable[[str], str]  # a new access token of "operator" or "admin"


@pytest.fixture
def seeded(transactional_db: None, start_gateway: Callable[..., live.LiveProcess]) -> Seeded:
    from django.contrib.auth.models import User

    from accounts import services as account_services
    from tenancy.services.keys import apikey_create
    from tenancy.services.members import member_add
    from tenancy.services.tenants import tenant_create
    from tenancy.services.tokens import access_token_create

    acme = tenant_create(slug="acme", name="Acme")
    tenant_create(slug="umbra", name="Umbra")
    users = {"operator": User.objects.create_user("operator", is_staff=True)}
    users["admin"] = member_add(tenant=acme, username="admin", role="admin").user
    member_add(tenant=acme, username="owner", role="owner")
    _, key_secret = apikey_create(tenant=acme, name="laptop")
    account_services.upstream_account_create(
        pool=account_services.pool_get_or_create(name="main"),
        base_url="http://127.0.0.1:9/v1",
        api_key=UPSTREAM_SECRET,
        models=[MODEL],
    )
    secrets = {"upstream key": UPSTREAM_SECRET, "api key": key_secret}

    def fresh_token(who: str) -> str:
        # A new token for each case: a generated DELETE /tokens/{id}/ may revoke the last one.
        _, token = access_token_create(user=users[who], name="schemathesis")
        secrets[f"{who} token {len(secrets)}"] = token
        return token

    gateway = start_gateway(**UNTHROTTLED)
    return Seeded(url=gateway.url, secrets=secrets, fresh_token=fresh_token)


def leaked(body: str, secrets: dict[str, str], auth_token: str) -> list[str]:
    found = [name for name, value in secrets.items() if value in body]
    return found + (["the caller's own token"] if auth_token in body else [])


def exercise(operation: Any, seeded: Seeded, who: str, session: requests.Session, seen: dict[str, set[int]]) -> None:
    """``EXAMPLES`` generated requests to one operation, each checked (see the module docstring)."""
    label = f"{operation.method.upper()} {operation.path}"

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        token = seeded.fresh_token(who)
        headers = {"Authorization": f"Bearer {token}"}
        response = case.call(base_url=seeded.url, session=session, headers=headers, timeout=30)
        case.validate_response(response, checks=CHECKS, headers=headers)
        seen.setdefault(label, set()).add(response.status_code)
        problems = leaked(response.text, seeded.secrets, token)
        assert problems == [], f"{label} answered {response.status_code} with {problems} in its body"

    run()


@pytest.mark.parametrize("who", ["operator", "admin"])
def test_the_schema_holds_against_the_live_api(seeded: Seeded, who: str) -> None:
    schema = schemathesis.openapi.from_url(f"{seeded.url}/api/schema/?format=json")
    results = list(schema.get_all_operations())
    assert [r.err() for r in results if isinstance(r, Err)] == []  # every operation loads
    operations = [r.ok() for r in results if isinstance(r, Ok)]
    assert len(operations) >= 3
    session = requests.Session()
    seen: dict[str, set[int]] = {}
    for operation in operations:
        exercise(operation, seeded, who, session, seen)
    # Every operation was reached, and the callers were let in (not all 401/403/429).
    assert set(seen) == {f"{op.method.upper()} {op.path}" for op in operations}
    assert any(code < 400 for codes in seen.values() for code in codes), seen
    assert not any(codes == {401} for codes in seen.values()), seen
