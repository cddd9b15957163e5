"""Writes of personal access tokens: create (the token is returned once), revoke.

A token authenticates its user on the management API (tenancy.api.authentication), never on
/v1/*: its marker (``gwt-``) differs from a data-plane key's, and each side accepts only its own.
"""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.infra.audit import audit_change, audit_snapshot
from tenancy.keys import generate_access_token, key_digest
from tenancy.models import AccessToken

_FIELDS = ("user", "name", "prefix", "expires_at", "revoked_at")
# Longest lifetime a token may be given (days); None (no expiry) is allowed too.
MAX_TOKEN_DAYS = 3650


def access_token_create(*, user: User, name: str = "", expires_in_days: int | None = None) -> tuple[AccessToken, str]:
    """Create a token for ``user``; return ``(row, token)``. The token is returned once and
    never stored (only its prefix and HMAC digest). ``expires_in_days`` None: no expiry."""
    if len(name) > 200:
        raise ValidationError("token name is too long (200 characters at most).", code="max_length")
    expires_at = None
    if expires_in_days is not None:
        if not 1 <= expires_in_days <= MAX_TOKEN_DAYS:
            raise ValidationError(f"expires_in_days must be from 1 to {MAX_TOKEN_DAYS}.", code="invalid")
        expires_at = timezone.now() + timedelta(days=expires_in_days)
    for _ in range(5):
        secret, prefix = generate_access_token()
        try:
            with transaction.atomic():
                token = AccessToken.objects.create(
                    user=user, name=name, prefix=prefix, digest=key_digest(secret), expires_at=expires_at
                )
                audit_change(
                    "token.create", target=token, before=None, after=audit_snapshot(token, _FIELDS), label=prefix
                )
        except IntegrityError:
            continue  # prefix collision: draw another
        return token, secret
    raise RuntimeError("could not allocate a unique token prefix")  # pragma: no cover


def access_token_revoke(*, token: AccessToken) -> AccessToken:
    """Revoke ``token`` (idempotent: a revoked token keeps its revocation time)."""
    if token.revoked_at is None:
        with transaction.atomic():
            before = audit_snapshot(token, _FIELDS)
            token.revoked_at = timezone.now()
            token.save(update_fields=["revoked_at"])
            audit_change(
                "token.revoke", target=token, before=before, after=audit_snapshot(token, _FIELDS), label=token.prefix
            )
    return token
