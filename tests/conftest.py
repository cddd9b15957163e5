"""Shared test set-up.

The environment is fixed in tests/settings.py (pytest-django loads settings before
any conftest). The same environment is handed to the live processes (gateway, fake
upstream) so they share the test database, the data directory and Redis if set; they
run the production settings module (see ``live.child_env``).

Test actors follow healthchecks: an owner tenant with its key, and an outsider
tenant with a key of its own that must never see the owner's things.

Live fixtures: ``live_gw`` (the session's gateway, with committed data for one test),
``start_gateway`` (a dedicated gateway process with its own environment, e.g. to stop it
or to serve with Daphne). ``live_gw`` waits for the gateway's usage writes before the
database is flushed.
"""

from __future__ import annotations

import dataclasses
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings

from tests import harness as live

DATA_DIR = Path(settings.DATA_DIR)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Start from an empty Redis database: the test database's ids restart at 1 on every
    run, and health records, limit counters or usage stream entries left by an earlier
    run would otherwise apply to this run's accounts and keys."""
    if settings.REDIS_URL:
        import redis

        redis.Redis.from_url(settings.REDIS_URL).flushdb()


MODEL = "gpt-test"
OTHER_MODEL = "gpt-other"


# One TLS context for every test client: building one per httpx.Client costs ~40 ms.
TLS = ssl.create_default_context()


@dataclasses.dataclass
class FakeUpstream:
    base_url: str  # e.g. http://127.0.0.1:PORT/v1
    control: httpx.Client = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.control = httpx.Client(base_url=self.base_url.removesuffix("/v1") + "/_fake", verify=TLS, timeout=10)

    def requests(self) -> list[dict[str, Any]]:
        return self.control.get("/requests").json()

    def last_request(self) -> dict[str, Any]:
        return self.requests()[-1]

    def stats(self) -> dict[str, Any]:
        return self.control.get("/stats").json()

    def reset(self) -> None:
        self.control.post("/reset").raise_for_status()


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
        upstream = FakeUpstream(f"http://127.0.0.1:{port}/v1")
        yield upstream
        upstream.control.close()


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
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, verify=TLS, **kwargs)

    def openai(self, key: str | None = None, **kwargs: Any) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key or self.owner.key, **kwargs)

    def post(self, body: Any, key: str | None = None, **kwargs: Any) -> httpx.Response:
        """One ``POST /v1/responses`` with raw httpx (``body`` as JSON unless ``content=`` is given)."""
        with self.http(key) as client:
            if "content" in kwargs:
                return client.post("/v1/responses", **kwargs)
            return client.post("/v1/responses", json=body, **kwargs)

    def add_account(self, models: list[str], base_url: str | None = None, pool: str = "main", **options: Any) -> Any:
        """Another upstream account (default: on the fake upstream, in the main pool)."""
        from accounts import services as account_services

        return account_services.upstream_account_create(
            pool=account_services.pool_get_or_create(name=pool),
            base_url=base_url or self.upstream.base_url,
            api_key=options.pop("api_key", "sk-upstream-secret"),
            models=models,
            **options,
        )

    def new_key(self, actor: Actor | None = None, **options: Any) -> tuple[Any, str]:
        """A further key of ``actor`` (default: the owner): ``(ApiKey, secret)``."""
        from tenancy.services.keys import apikey_create

        return apikey_create(tenant=(actor or self.owner).tenant, name="extra key", **options)

    def wait_usage(self, request_id: str, timeout: float = 10.0) -> Any:
        """The usage record of a request, once the gateway's meter has written it."""
        from tenancy.models import UsageRecord

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = UsageRecord.objects.filter(request_id=request_id).first()
            if record is not None:
                return record
            time.sleep(0.01)
        raise AssertionError(f"no usage record for {request_id} after {timeout}s")

    def drain_usage(self) -> None:
        """Wait until the gateway's meter has written the usage of every request made so far.

        The meter writes in order, so once a rejected sentinel request is recorded, so is every
        request before it. Called before the database is flushed: a usage INSERT racing the
        flush's TRUNCATE deadlocks on PostgreSQL (and fails its foreign keys on SQLite).
        """
        response = self.post({"model": MODEL, "input": "drain", "store": True}, key=self.outsider.key)
        if response.status_code == 400:  # the outsider's key may have been revoked by the test
            self.wait_usage(response.headers["x-request-id"])


def make_actor(slug: str, **key_options: Any) -> Actor:
    from tenancy.services.keys import apikey_create
    from tenancy.services.tenants import tenant_create

    tenant = tenant_create(slug=slug, name=slug.title())
    api_key, secret = apikey_create(tenant=tenant, name=f"{slug} key", **key_options)
    return Actor(tenant=tenant, key=secret, api_key=api_key)


@pytest.fixture
def live_gw(transactional_db: None, live_gateway: str, fake_upstream: FakeUpstream) -> Iterator[Live]:
    from accounts import services as account_services

    pool = account_services.pool_get_or_create(name="main")
    account = account_services.upstream_account_create(
        pool=pool, base_url=fake_upstream.base_url, api_key="sk-upstream-secret", models=[MODEL, OTHER_MODEL]
    )
    gateway = Live(
        url=live_gateway,
        upstream=fake_upstream,
        owner=make_actor("owner"),
        outsider=make_actor("outsider"),
        account=account,
    )
    yield gateway
    gateway.drain_usage()


@pytest.fixture
def start_gateway(live_env: dict[str, str], fake_upstream: FakeUpstream) -> Iterator[Callable[..., live.LiveProcess]]:
    """Start a dedicated gateway process: ``start_gateway(server="uvicorn", args=(), **env_overrides)``.

    Every process started is stopped (SIGTERM) at teardown unless the test stopped it, and
    whatever it left running is killed (``LiveProcess.reap``).
    """
    started: list[live.LiveProcess] = []

    def start(server: str = "uvicorn", args: tuple[str, ...] = (), **env: str) -> live.LiveProcess:
        port = live.free_port()
        log = DATA_DIR / f"gateway-{server}-{port}.log"
        process = live.gateway(port, {**live_env, **env}, log, server, *args)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.reap()
