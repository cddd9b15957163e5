"""OpenID Connect sign-in (mozilla-django-oidc), off unless ``GATEWAY_OIDC_*`` configure it.

Routes under ``/oidc/``: ``authenticate/`` sends the browser to the provider (``?next=`` a local
page to land on), ``callback/`` takes the provider's answer, ``logout/`` (POST) signs out. While
OIDC is off every one of them is a 404 and the backend authenticates nobody.

The ID token is checked here more strictly than the library does by default: signature with
the provider's JWKS (or the client secret for HS*), algorithm, expiry, ``iss`` equal to
``GATEWAY_OIDC_ISSUER`` and ``aud`` containing the client id. The claims (the ID token's,
merged with the userinfo endpoint's when one is configured) then give the username
(``GATEWAY_OIDC_USERNAME_CLAIM``), the tenant memberships (``GATEWAY_OIDC_TENANTS_CLAIM``:
``slug:role`` entries) and, if configured, operator status; tenancy.services.sso writes them.
"""

from __future__ import annotations

import logging
from typing import Any

import jwt
import requests
from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import SuspiciousOperation
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase
from django.urls import path
from mozilla_django_oidc.auth import OIDCAuthenticationBackend
from mozilla_django_oidc.views import OIDCAuthenticationCallbackView, OIDCAuthenticationRequestView, OIDCLogoutView

from accounts.infra.api import request_id_of
from accounts.infra.audit import Actor, acting_as
from tenancy.services.sso import claim_values, sso_user_sync

log = logging.getLogger(__name__)

# Clock skew allowed between the provider and the gateway when checking exp/iat (seconds).
LEEWAY_SECONDS = 60


def oidc_enabled() -> bool:
    return bool(getattr(settings, "GATEWAY_OIDC_ENABLED", False))


class GatewayOidcBackend(OIDCAuthenticationBackend):
    """mozilla-django-oidc's backend with strict ID token checks and membership sync."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.enabled = oidc_enabled()
        if self.enabled:
            super().__init__(*args, **kwargs)

    def authenticate(self, request: HttpRequest | None, **kwargs: Any) -> User | None:
        if not self.enabled:
            return None
        try:
            user: User | None = super().authenticate(request, **kwargs)
        except (requests.RequestException, SuspiciousOperation) as exc:
            # The provider unreachable or a refused token: a failed sign-in, never a 500.
            log.warning("single sign-on failed: %s", exc)
            return None
        return user

    def get_payload_data(self, token: bytes | str, key: Any) -> dict[str, Any]:
        algorithm = self.OIDC_RP_SIGN_ALGO
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise SuspiciousOperation("The ID token is not a JWT.") from None
        if header.get("alg") != algorithm:
            raise SuspiciousOperation(f"The ID token is signed with {header.get('alg')!r}, not {algorithm!r}.")
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.OIDC_RP_CLIENT_ID,
                issuer=settings.GATEWAY_OIDC_ISSUER,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise SuspiciousOperation(f"The ID token was refused: {exc}.") from None
        return payload

    def get_userinfo(self, access_token: str, id_token: str, payload: dict[str, Any]) -> dict[str, Any]:
        claims = dict(payload)
        if self.OIDC_OP_USER_ENDPOINT:
            more = super().get_userinfo(access_token, id_token, payload)
            if more.get("sub") != payload.get("sub"):
                raise SuspiciousOperation("The userinfo answer is about another subject.")
            claims.update(more)
        return claims

    def _username(self, claims: dict[str, Any]) -> str:
        value = claims.get(settings.GATEWAY_OIDC_USERNAME_CLAIM)
        return value.strip() if isinstance(value, str) else ""

    def verify_claims(self, claims: dict[str, Any]) -> bool:
        username = self._username(claims)
        return 0 < len(username) <= 150

    def filter_users_by_claims(self, claims: dict[str, Any]) -> Any:
        return User.objects.filter(username=self._username(claims))

    def create_user(self, claims: dict[str, Any]) -> User:
        return self._sync(claims)

    def update_user(self, user: User, claims: dict[str, Any]) -> User:
        return self._sync(claims)

    def _sync(self, claims: dict[str, Any]) -> User:
        operator_claim = settings.GATEWAY_OIDC_OPERATOR_CLAIM
        is_operator = (
            settings.GATEWAY_OIDC_OPERATOR_VALUE in claim_values(claims, operator_claim) if operator_claim else None
        )
        username = self._username(claims)
        request = getattr(self, "request", None)
        actor = Actor(
            source="oidc",
            label=username,
            ip=request.META.get("REMOTE_ADDR") if request is not None else None,
            request_id=request_id_of(request) if request is not None else "",
        )
        email = claims.get("email")
        with acting_as(actor):
            return sso_user_sync(
                username=username,
                email=email if isinstance(email, str) else "",
                tenant_entries=claim_values(claims, settings.GATEWAY_OIDC_TENANTS_CLAIM),
                is_operator=is_operator,
            ).user


class _OnlyWhenEnabled:
    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not oidc_enabled():
            raise Http404("Single sign-on is not configured.")
        return super().dispatch(request, *args, **kwargs)  # type: ignore[misc]


class SignInView(_OnlyWhenEnabled, OIDCAuthenticationRequestView):
    pass


class CallbackView(_OnlyWhenEnabled, OIDCAuthenticationCallbackView):
    pass


class SignOutView(_OnlyWhenEnabled, OIDCLogoutView):
    pass


def sign_in_failed(request: HttpRequest) -> HttpResponse:
    """Where a failed sign-in lands (the reason is in the gateway's log, never shown)."""
    if not oidc_enabled():
        raise Http404("Single sign-on is not configured.")
    return HttpResponse(
        "Sign-in failed. Ask your administrator, or try again.\n", status=401, content_type="text/plain"
    )


urlpatterns = [
    path("authenticate/", SignInView.as_view(), name="oidc_authentication_init"),
    path("callback/", CallbackView.as_view(), name="oidc_authentication_callback"),
    path("logout/", SignOutView.as_view(), name="oidc_logout"),
    path("failed/", sign_in_failed, name="oidc_failed"),
]
