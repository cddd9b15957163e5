"""Authentication of the management API: personal access tokens (and the console's session).

``Authorization: Bearer gwt-...`` authenticates as the token's user while the token is neither
expired nor revoked and the user is active. A data-plane key (``sk-gw-...``) never does: it is
refused with a 401 that says so. Failed attempts are counted per client address in the cache
(Redis when configured, so across replicas); past ``GATEWAY_API_AUTH_FAILURES`` within
``GATEWAY_API_AUTH_WINDOW`` seconds, further attempts from that address get 429 before any
token is looked up.
"""

from __future__ import annotations

import hmac
from datetime import timedelta
from typing import Any, NoReturn

from django.conf import settings
from django.core.cache import cache
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request

from tenancy.keys import access_token_prefix, key_digest, key_prefix
from tenancy.models import AccessToken

# last_used_at is written at most this often per token (it is informative, not exact).
LAST_USED_RESOLUTION = timedelta(minutes=1)


def _failure_key(request: Request) -> str:
    return f"api-auth-failures:{request.META.get('REMOTE_ADDR', '')}"


class AccessTokenAuthentication(BaseAuthentication):
    """``Authorization: Bearer <personal access token>``; see the module docstring."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[Any, AccessToken] | None:
        header = get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None  # not ours: the session (or nothing) decides
        failures = cache.get(_failure_key(request), 0)
        if failures >= settings.GATEWAY_API_AUTH_FAILURES:
            raise exceptions.Throttled(settings.GATEWAY_API_AUTH_WINDOW, "Too many failed authentications.")
        if len(header) != 2:
            self._fail(request, "Invalid Authorization header: use `Bearer <token>`.")
        try:
            raw = header[1].decode("ascii")
        except UnicodeDecodeError:
            self._fail(request, "Invalid token.")
        if key_prefix(raw) is not None:
            self._fail(request, "An API key of the data plane does not authenticate the management API.")
        prefix = access_token_prefix(raw)
        token = AccessToken.objects.select_related("user").filter(prefix=prefix).first() if prefix is not None else None
        if token is None or not hmac.compare_digest(token.digest, key_digest(raw)):
            self._fail(request, "Invalid token.")
        now = timezone.now()
        if token.revoked_at is not None or (token.expires_at is not None and token.expires_at <= now):
            self._fail(request, "The token is expired or revoked.")
        if not token.user.is_active:
            self._fail(request, "The token's user is inactive.")
        if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
            AccessToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return token.user, token

    def _fail(self, request: Request, message: str) -> NoReturn:
        key = _failure_key(request)
        if not cache.add(key, 1, settings.GATEWAY_API_AUTH_WINDOW):
            try:
                cache.incr(key)
            except ValueError:  # expired in between
                cache.add(key, 1, settings.GATEWAY_API_AUTH_WINDOW)
        raise exceptions.AuthenticationFailed(message)

    def authenticate_header(self, request: Request) -> str:
        return f'{self.keyword} realm="api"'


class AccessTokenScheme(OpenApiAuthenticationExtension):
    """The token scheme in the OpenAPI schema (HTTP bearer)."""

    target_class = "tenancy.api.authentication.AccessTokenAuthentication"
    name = "accessToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "A personal access token (`gwt-...`)."}
