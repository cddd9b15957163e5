"""Shared test set-up.

The environment is fixed in tests/settings.py (pytest-django loads settings before
any conftest). The same environment is handed to the live processes (gateway, fake
upstream) so they share the test database, the data directory and Redis if set.

Test actors follow healthchecks: an owner tenant with its key, and an outsider
tenant with a key of its own that must never see the owner's things.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings

from tests import live

DATA_DIR = Path(settings.DATA_DIR)
MODEL = "gpt-test"
OTHER_MODEL = "gpt-other"


@dataclasses.dataclass
class FakeUpstream:
    base_url: str  # e.g. http://127.0.0.1:PORT/v1

    def requests(self) -> list[dict[str, Any]]:
        return httpx.get(self.base_url.removesuffix("/v1") + "/_fake/requests").json()

    def last_request(self) -> dict[str, Any]:
        return self.requests()[-1]

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.base_url.removesuffix("/v1") + "/_fake/stats").json()

    def reset(self) -> None:
        httpx.post(self.base_url.removesuffix("/v1") + "/_fake/reset")


def _database_url() -> str:
    from django.db import connection

    conf = connection.settings_dict
    if conf["ENGINE"].endswith("sqlite3"):
        return "sqlite:///" + str(conf["NAME"])
    auth = conf["USER"] + (":" + conf["PASSWORD"] if conf["PASSWORD"] else "")
    return f"postgres://{auth}@{conf['HOST'] or '127.0.0.1'}:{conf['PORT'] or 5432}/{conf['NAME']}"


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstream]:
    port = live.free_port()
    proc = live.fake_upstream(port, live.child_env(), DATA_DIR / "fake-upstream.log")
    with live.running(proc):
        yield FakeUpstream(f"http://127.0.0.1:{port}/v1")


@pytest.fixture(scope="session")
def live_env(django_db_setup: None) -> dict[str, str]:
    """Environment for live gateway processes: the test database of this session."""
    return live.child_env(DATABASE_URL=_database_url())


@pytest.fixture(scope="session")
def live_gateway(live_env: dict[str, str], fake_upstream: FakeUpstream) -> Iterator[str]:
    port = live.free_port()
    with live.running(live.gateway(port, live_env, DATA_DIR / "gateway.log")):
        yield f"http://127.0.0.1:{port}"


@dataclasses.dataclass
class Actor:
    tenant: Any
    key: str
    api_key: Any


@dataclasses.dataclass
class Live:
    """A running gateway with an owner, an outsider and one upstream account."""

    url: str
    upstream: FakeUpstream
    owner: Actor
    outsider: Actor
    account: Any

    def http(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"authorization": f"Bearer {key or self.owner.key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def openai(self, key: str | None = None, **kwargs: Any) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key or self.owner.key, **kwargs)

    def wait_usage(self, request_id: str, timeout: float = 10.0) -> Any:
        """The usage record of a request, once the gateway's meter has written it."""
        from tenancy.models import UsageRecord

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = UsageRecord.objects.filter(request_id=request_id).first()
            if record is not None:
                return record
            time.sleep(0.05)
        raise AssertionError(f"no usage record for {request_id} after {timeout}s")


def make_actor(slug: str, **key_options: Any) -> Actor:
    from tenancy import services

    tenant = services.tenant_create(slug=slug, name=slug.title())
    api_key, secret = services.apikey_create(tenant=tenant, name=f"{slug} key", **key_options)
    return Actor(tenant=tenant, key=secret, api_key=api_key)


@pytest.fixture
def live_gw(transactional_db: None, live_gateway: str, fake_upstream: FakeUpstream) -> Live:
    from accounts import services as account_services

    pool = account_services.pool_get_or_create(name="main")
    account = account_services.upstream_account_create(
        pool=pool, base_url=fake_upstream.base_url, api_key="sk-upstream-secret", models=[MODEL, OTHER_MODEL]
    )
    return Live(
        url=live_gateway,
        upstream=fake_upstream,
        owner=make_actor("owner"),
        outsider=make_actor("outsider"),
        account=account,
    )
