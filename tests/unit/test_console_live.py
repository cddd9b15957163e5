"""The live view's socket (tenancy/console/live.py) and the data plane's feed
(gateway/dataplane/live.py), with Channels' test communicator and the configured channel layer.

(Over a real socket from a running gateway: tests/live/test_live_console_live.py.)
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import channel_layers, get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser, User
from django_otp import DEVICE_ID_SESSION_KEY
from django_otp.plugins.otp_totp.models import TOTPDevice

from gateway.dataplane.live import LiveFeed
from tenancy.console.live import REFUSED, LiveConsumer
from tenancy.live import LocalWatchers
from tenancy.models import Membership, Role, Tenant
from tenancy.services.members import member_add, member_remove
from tenancy.services.tenants import tenant_create

pytestmark = pytest.mark.django_db(transaction=True)


def event(tenant: Tenant, n: int) -> dict[str, Any]:
    return {
        "request_id": f"req_{tenant.slug}_{n}",
        "tenant_id": tenant.pk,
        "model": "gpt-4.1",
        "status_code": 200,
        "outcome": "completed",
        "total_tokens": 15,
        "latency_ms": 12.34,
        "stream": False,
        "created_at": datetime.now(UTC),
    }


async def watcher(user: Any, session: dict[str, Any] | None = None) -> tuple[WebsocketCommunicator, bool, Any]:
    communicator = WebsocketCommunicator(LiveConsumer.as_asgi(), "/console/live/ws/")
    communicator.scope["user"] = user
    communicator.scope["session"] = session or {}
    connected, code = await communicator.connect()
    return communicator, connected, code


async def publish(feed: LiveFeed, *events: tuple[dict[str, Any], str]) -> None:
    await feed._refresh_watching()
    for item, prefix in events:
        feed.publish(item, prefix)
    await feed.flush(get_channel_layer())


async def received(communicator: WebsocketCommunicator) -> list[str]:
    message = await communicator.receive_json_from(timeout=5)
    return [line["request_id"] for line in message["lines"]]


@pytest.fixture(autouse=True)
def _fresh_layer() -> None:
    """A channel layer per test: each test runs its own event loop, and channels_redis's
    connections belong to the loop that opened them."""
    channel_layers.backends.clear()


@pytest.fixture
def tenants() -> tuple[Tenant, Tenant]:
    acme, other = tenant_create(slug="acme", name="Acme"), tenant_create(slug="other", name="Other")
    member_add(tenant=acme, username="vera", role=Role.VIEWER, password="a-long-enough-password-42")
    User.objects.create_user("olga", is_staff=True)
    User.objects.create_user("nobody")
    return acme, other


def test_operators_see_every_request_and_members_their_tenants_only(tenants: tuple[Tenant, Tenant]) -> None:
    acme, other = tenants
    olga, vera = User.objects.get(username="olga"), User.objects.get(username="vera")

    async def scenario() -> tuple[list[str], list[str], bool]:
        operator, ok_operator, _ = await watcher(olga)
        member, ok_member, _ = await watcher(vera)
        assert ok_operator
        assert ok_member
        await publish(LiveFeed(), (event(acme, 1), "sk-gw-acme"), (event(other, 1), "sk-gw-other"))
        seen_by_operator, seen_by_member = await received(operator), await received(member)
        nothing_else = await member.receive_nothing(timeout=0.3)
        await operator.disconnect()
        await member.disconnect()
        return seen_by_operator, seen_by_member, nothing_else

    by_operator, by_member, nothing_else = asyncio.run(scenario())
    assert by_operator == ["req_acme_1", "req_other_1"]
    assert by_member == ["req_acme_1"]
    assert nothing_else
    assert LocalWatchers.count == 0


@pytest.mark.parametrize("who", ["anonymous", "no tenant", "second factor pending"])
def test_who_may_not_watch_is_refused(tenants: tuple[Tenant, Tenant], who: str) -> None:
    user: Any = AnonymousUser() if who == "anonymous" else User.objects.get(username="nobody")
    if who == "second factor pending":
        user = User.objects.get(username="olga")
        TOTPDevice.objects.create(user=user, name="phone", confirmed=True)

    async def scenario() -> tuple[bool, Any]:
        _, connected, code = await watcher(user)
        return connected, code

    assert asyncio.run(scenario()) == (False, REFUSED)
    assert LocalWatchers.count == 0


def test_a_verified_second_factor_may_watch(tenants: tuple[Tenant, Tenant]) -> None:
    user = User.objects.get(username="olga")
    device = TOTPDevice.objects.create(user=user, name="phone", confirmed=True)

    async def scenario() -> bool:
        communicator, connected, _ = await watcher(user, {DEVICE_ID_SESSION_KEY: device.persistent_id})
        await communicator.disconnect()
        return connected

    assert asyncio.run(scenario())


def test_the_feed_buffers_nothing_while_nobody_watches(tenants: tuple[Tenant, Tenant]) -> None:
    acme, _ = tenants
    feed = LiveFeed()
    asyncio.run(feed._refresh_watching())
    assert feed.watching is False
    feed.publish(event(acme, 1), "sk-gw-acme")
    assert not feed._lines


@pytest.mark.parametrize("change", ["removed", "suspended"])
def test_a_watcher_who_loses_access_is_closed_at_the_next_check(
    tenants: tuple[Tenant, Tenant], change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    acme, _ = tenants
    monkeypatch.setattr("tenancy.console.live.RECHECK_SECONDS", 0.05)
    vera = User.objects.get(username="vera")
    membership = Membership.objects.get(user=vera, tenant=acme)

    def take_access() -> None:
        if change == "removed":
            member_remove(membership=membership)
        else:
            User.objects.filter(pk=vera.pk).update(is_active=False)

    async def scenario() -> tuple[bool, dict[str, Any]]:
        member, connected, _ = await watcher(vera)
        await database_sync_to_async(take_access)()
        closed = await member.receive_output(timeout=5)
        return connected, closed

    connected, closed = asyncio.run(scenario())
    assert connected
    assert closed == {"type": "websocket.close", "code": REFUSED}
    assert LocalWatchers.count == 0


def test_a_watcher_who_leaves_one_tenant_keeps_the_other(
    tenants: tuple[Tenant, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    acme, other = tenants
    monkeypatch.setattr("tenancy.console.live.RECHECK_SECONDS", 0.05)
    member_add(tenant=other, username="vera", role=Role.VIEWER)
    vera = User.objects.get(username="vera")
    membership = Membership.objects.get(user=vera, tenant=acme)

    async def scenario() -> tuple[list[str], bool]:
        member, connected, _ = await watcher(vera)
        assert connected
        await database_sync_to_async(member_remove)(membership=membership)
        await asyncio.sleep(0.3)  # a few checks
        await publish(LiveFeed(), (event(acme, 1), "sk-gw-acme"), (event(other, 1), "sk-gw-other"))
        seen = await received(member)
        await member.disconnect()
        return seen, True

    seen, _ = asyncio.run(scenario())
    assert seen == ["req_other_1"]
