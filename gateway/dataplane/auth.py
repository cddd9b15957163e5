"""Who is calling and what they may reach: the bearer key and the attempt plan.

:func:`authenticate` resolves the key from the key directory (a cold key: one indexed
database read off the event loop, gateway/config/keys.py) or raises a 401 (a 503 when
the database cannot say); :func:`plan_request` reads only the snapshot (no I/O) and turns
the requested model (and its ``fallbacks``) into the ordered (public model, pool, upstream
model) attempts, or raises 403, 404 or 503.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from accounts.routing.routes import FallbackNotAllowed, attempt_plan, fallback_models
from gateway.config.keys import KeyDirectory
from gateway.config.snapshot import KeyInfo, Snapshot
from gateway.contract.errors import INVALID_REQUEST, SERVER, GatewayError
from gateway.dataplane.asgi_io import Scope, header
from gateway.dataplane.outages import database_errors, unavailable
from tenancy.keys import key_digest, key_prefix

Plan = list[tuple[str, int, str]]

# A cold key's read failed (the database refused) or got no answer in time (TimeoutError).
_KEY_READ_ERRORS: tuple[type[BaseException], ...] = (*database_errors(), TimeoutError)


def _unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, type=INVALID_REQUEST, code="invalid_api_key")


async def authenticate(scope: Scope, keys: KeyDirectory) -> KeyInfo:
    """Resolve the bearer key of a request, or raise a 401 (a 503 if its read failed)."""
    value = header(scope, b"authorization")
    if value is None:
        raise _unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
    if value[:7].lower() != b"bearer ":
        raise _unauthorized("The Authorization header must be 'Bearer YOUR_KEY'.")
    token = value[7:].strip().decode("latin-1")
    prefix = key_prefix(token)
    info = keys.cached(prefix) if prefix else None
    if info is None and prefix:
        try:
            info = await keys.get(prefix)
        except _KEY_READ_ERRORS:  # the database is down or silent: no answer for the key
            raise unavailable("database") from None
    if info is None or not hmac.compare_digest(key_digest(token), info.digest):
        # Never echo the key: not even a part of it.
        raise _unauthorized("Incorrect API key provided.")
    if info.expires_at is not None and time.time() >= info.expires_at:
        raise _unauthorized("This API key has expired.")
    return info


def _not_allowed(model: str, param: str | None = None) -> GatewayError:
    return GatewayError(
        403, f"This API key does not have access to model '{model}'", code="model_not_allowed", param=param
    )


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404, f"The model '{model}' does not exist or you do not have access to it.", code="model_not_found"
    )


def plan_request(snapshot: Snapshot, key: KeyInfo, request: dict[str, Any]) -> Plan:
    """The (public model, pool, upstream model) attempts for a request: 403, 404 or 503 otherwise."""
    model = request["model"]
    if key.allowed_models is not None and model not in key.allowed_models:
        raise _not_allowed(model)
    try:
        extra = fallback_models(model, request.get("fallbacks"), key.allowed_models)
    except FallbackNotAllowed as exc:
        raise _not_allowed(exc.model, exc.param) from None
    plan = attempt_plan(model, extra, snapshot.routes)
    if plan:
        return plan
    if model in snapshot.known_models or any(name in snapshot.known_models for name in extra):
        raise GatewayError(
            503, f"No upstream account is available for model '{model}'.", type=SERVER, code="no_accounts"
        )
    raise model_not_found(model)
