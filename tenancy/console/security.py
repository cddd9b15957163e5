"""Strict headers for the console's pages: a Content-Security-Policy with no inline script or
style and nothing from another origin (every asset is served by the gateway itself)."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

CONSOLE_PREFIX = "/console/"
CONSOLE_CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


class ConsoleSecurityHeadersMiddleware:
    """Adds the CSP and no-store caching to every response under /console/."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if request.path.startswith(CONSOLE_PREFIX):
            response["Content-Security-Policy"] = CONSOLE_CSP
            response["Cache-Control"] = "no-store"
            response["X-Frame-Options"] = "DENY"
        return response
