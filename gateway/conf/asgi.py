"""ASGI entry point: /v1/*, /readyz and /metrics go to the data plane, everything else to Django.

Served by uvicorn (``manage.py serve``, the measured default) or by Daphne
(``manage.py serve --server daphne`` or ``daphne gateway.conf.asgi:application``).
"""

from __future__ import annotations

import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.conf.settings")
django_application = get_asgi_application()

# Imported after Django is set up: the data plane reads settings at import time.
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import re_path  # noqa: E402

from gateway.dataplane.app import gateway_app  # noqa: E402
from gateway.dataplane.socket import ResponsesSocket  # noqa: E402
from tenancy.console.live import LiveConsumer  # noqa: E402


class HttpRoutes:
    """HTTP requests: ``/v1/*``, ``/readyz`` and ``/metrics`` to ``dataplane``, every other path
    to ``django``. /readyz is the data plane's readiness (its dependencies); /healthz (Django)
    is liveness; /metrics the Prometheus metrics (gateway/observability/exposition.py).

    Two string tests on ``scope["path"]``: channels' ``URLRouter`` matched django.urls
    patterns and copied the scope for every request, 3-6 µs a request where this takes 0.6-1.2
    (``python -m bench.router_micro``).
    """

    def __init__(self, dataplane: Any, django: Any) -> None:
        self.dataplane = dataplane
        self.django = django

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope["path"]
        if path.startswith("/v1/") or path == "/readyz" or path == "/metrics":
            await self.dataplane(scope, receive, send)
        else:
            await self.django(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": HttpRoutes(gateway_app, django_application),
        # /v1/responses over a WebSocket (the Codex CLI's transport): gateway/dataplane/socket.py.
        # The console's live view (tenancy/console/live.py): the session's user, a same-site Origin.
        "websocket": URLRouter(
            [
                re_path(r"^v1/responses$", ResponsesSocket.as_asgi()),
                re_path(
                    r"^console/live/ws/$",
                    AllowedHostsOriginValidator(AuthMiddlewareStack(LiveConsumer.as_asgi())),
                ),
            ]
        ),
        "lifespan": gateway_app,
    }
)
