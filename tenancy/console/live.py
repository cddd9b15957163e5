"""The live view: ``/console/live/`` and its WebSocket ``/console/live/ws/``.

The socket is authenticated by the console's session (Channels' AuthMiddlewareStack) and
checked against ALLOWED_HOSTS for its Origin (gateway/conf/asgi.py). Anonymous visitors, users
whose second factor is still pending in that session, and users of no tenant are closed with
code 4403. Operators join the group of every request, members the groups of their tenants
(tenancy/live.py); the lines come from the data plane's feed (gateway/dataplane/live.py).
While it is open, a socket counts as a local watcher and, with Redis, keeps the shared watch
key alive so every replica publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django_otp import DEVICE_ID_SESSION_KEY

from accounts.infra.redis import raise_if_cancelled
from tenancy.access import is_operator, tenants_for
from tenancy.console.common import console_view, has_confirmed_device
from tenancy.live import (
    GROUP_ALL,
    WATCH_KEY,
    WATCH_KEY_SECONDS,
    WATCH_REFRESH_SECONDS,
    LocalWatchers,
    tenant_group,
)

REFUSED = 4403
# How often an open socket checks again that its user may still watch (membership, active).
RECHECK_SECONDS = 30.0


@console_view
def live(request: HttpRequest) -> HttpResponse:
    return render(request, "console/live.html", {"operator": is_operator(request.user)})


def _groups_of(user: Any, session: Any) -> list[str] | None:
    """The groups ``user`` may watch (None: refused)."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return None
    if has_confirmed_device(user) and not (session and session.get(DEVICE_ID_SESSION_KEY)):
        return None  # signed in with a password only: the second factor is still due
    if is_operator(user):
        return [GROUP_ALL]
    ids = list(tenants_for(user).values_list("id", flat=True))
    return [tenant_group(tenant_id) for tenant_id in ids] or None


def _groups_now(user_id: int | None, session: Any) -> list[str] | None:
    """:func:`_groups_of` the user as the database has them now (None: refused or gone)."""
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.filter(pk=user_id).first() if user_id is not None else None
    return _groups_of(user, session) if user is not None else None


class LiveConsumer(AsyncJsonWebsocketConsumer):
    """Pushes ``{"lines": [...]}`` messages: the requests that finished since the last one."""

    groups_joined: list[str]
    keeper: asyncio.Task[None] | None = None
    checker: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        self.groups_joined = []
        groups = await database_sync_to_async(_groups_of)(self.scope.get("user"), self.scope.get("session"))
        if groups is None or self.channel_layer is None:
            await self.close(code=REFUSED)
            return
        for group in groups:
            await self.channel_layer.group_add(group, self.channel_name)
        self.groups_joined = groups
        LocalWatchers.count += 1
        if settings.REDIS_URL:
            self.keeper = asyncio.get_running_loop().create_task(self._keep_watching())
        self.checker = asyncio.get_running_loop().create_task(self._recheck())
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.groups_joined:
            LocalWatchers.count -= 1
            for group in self.groups_joined:
                await self.channel_layer.group_discard(group, self.channel_name)
            self.groups_joined = []
        if self.keeper is not None:
            self.keeper.cancel()
            # Bounded: the keeper ends at its next await (see _keep_watching).
            await asyncio.wait({self.keeper}, timeout=2.0)
            self.keeper = None
        if self.checker is not None and self.checker is not asyncio.current_task():
            self.checker.cancel()
            await asyncio.wait({self.checker}, timeout=2.0)
        self.checker = None

    async def _recheck(self) -> None:
        """Every RECHECK_SECONDS, the groups the user may watch now (from the database): a
        tenant they left is dropped at once; a user suspended (inactive) or left with no tenant
        stops receiving lines and is closed with 4403."""
        user = self.scope.get("user")
        while self.groups_joined:
            await asyncio.sleep(RECHECK_SECONDS)
            groups = await database_sync_to_async(_groups_now)(getattr(user, "pk", None), self.scope.get("session"))
            kept = [group for group in self.groups_joined if group in (groups or [])]
            if not kept:
                await self.disconnect(REFUSED)  # leaves every group: no line reaches it from now
                await self.close(code=REFUSED)
                return
            for group in self.groups_joined:
                if group not in kept:
                    await self.channel_layer.group_discard(group, self.channel_name)
            self.groups_joined = kept

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """The view only listens: anything the browser sends is ignored."""

    async def live_lines(self, message: dict[str, Any]) -> None:
        """``message["text"]``: the lines as a JSON array, encoded once by the feed."""
        await self.send(text_data='{"lines":' + message["text"] + "}")

    async def _keep_watching(self) -> None:
        """With Redis: keep the shared watch key alive while this view is open.

        Ends when cancelled, even when the cancellation lands inside a Redis call that turns it
        into an ordinary exception (redis-py does while connecting): a keeper that swallowed it
        would sleep on forever and hang the event loop's shutdown.
        """
        from redis.asyncio import Redis

        client = Redis.from_url(settings.REDIS_URL)
        try:
            while True:
                try:
                    await client.set(WATCH_KEY, "1", ex=WATCH_KEY_SECONDS)
                except Exception:  # Redis down: the local count still works
                    raise_if_cancelled()
                raise_if_cancelled()  # also when redis-py swallowed it whole
                await asyncio.sleep(WATCH_REFRESH_SECONDS)
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()
