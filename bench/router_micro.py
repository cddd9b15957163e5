"""CPU cost of routing one HTTP request to the data plane: ``python -m bench.router_micro``.

Times channels' ``URLRouter`` with the patterns ``gateway/conf/asgi.py`` used (``^v1/``,
``^readyz$``, ``^metrics$``, then everything) against :class:`gateway.conf.asgi.HttpRoutes`,
both in front of an application that returns at once, for a ``POST /v1/responses`` scope.
Run with the environment ``manage.py serve`` needs (``SECRET_KEY``, ``GATEWAY_ENCRYPTION_KEY``).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.conf.settings")
django.setup()

from channels.routing import URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402

from gateway.conf.asgi import HttpRoutes  # noqa: E402

ROUNDS = 200_000


async def _app(scope: Any, receive: Any, send: Any) -> None:
    return None


SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "server": ("127.0.0.1", 8000),
    "client": ("127.0.0.1", 50000),
    "scheme": "http",
    "method": "POST",
    "root_path": "",
    "path": "/v1/responses",
    "raw_path": b"/v1/responses",
    "query_string": b"",
    "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
    "state": {},
}


async def _time(router: Any) -> float:
    started = time.perf_counter()
    for _ in range(ROUNDS):
        await router(SCOPE, None, None)
    return (time.perf_counter() - started) / ROUNDS * 1e6


async def main() -> None:
    routers = {
        "channels URLRouter": URLRouter(
            [re_path(r"^v1/", _app), re_path(r"^readyz$", _app), re_path(r"^metrics$", _app), re_path(r"", _app)]  # type: ignore[arg-type]
        ),
        "HttpRoutes": HttpRoutes(_app, _app),
    }
    for _ in range(2):
        for name, router in routers.items():
            print(f"{name:20s} {await _time(router):6.2f} µs a request")


if __name__ == "__main__":
    asyncio.run(main())
