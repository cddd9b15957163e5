"""ASGI entry point: /v1/*, /readyz and /metrics go to the data plane, everything else to Django.

Served by uvicorn (``manage.py serve``, the measured default) or by Daphne
(``manage.py serve --server daphne`` or ``daphne gateway.conf.asgi:application``).
"""

from __future__ import annotations

import os

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

application = ProtocolTypeRouter(
    {
        # channels routes ASGI apps with django.urls patterns, whose stubs expect views.
        # /readyz is the data plane's readiness (its dependencies); /healthz (Django) is liveness;
        # /metrics the Prometheus metrics (gateway/observability/exposition.py).
        "http": URLRouter(
            [
                re_path(r"^v1/", gateway_app),  # type: ignore[arg-type]
                re_path(r"^readyz$", gateway_app),  # type: ignore[arg-type]
                re_path(r"^metrics$", gateway_app),  # type: ignore[arg-type]
                re_path(r"", django_application),  # type: ignore[arg-type]
            ]
        ),
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
