"""Writes of tenant API keys: create (the secret is returned once), change details and limits, revoke.

Every write is audited; a key appears in the audit log by its id and visible prefix only.

Key material (generation, prefix, digest) lives in tenancy.keys; this module stores it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Unpack

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from accounts.crypto import decrypt_credential, encrypt_credential
from accounts.infra.audit import audit_fields, audit_snapshot, audited_update
from tenancy.keys import generate_api_key, key_digest
from tenancy.models import ApiKey, ConfigChange, Tenant
from tenancy.services.changes import config_change_record
from tenancy.services.limits import (
    APIKEY_LIMIT_FIELDS,
    ApiKeyLimits,
    limits_apply,
    limits_clean,
    limits_update,
    limits_within_tenant,
)

# What the audit log shows of a key (never its digest).
_AUDITED = ("name", "prefix", "allowed_models", "expires_at", "revoked_at", *sorted(APIKEY_LIMIT_FIELDS))
# apikey_details_set: a field given as UNCHANGED keeps its value.
UNCHANGED: object = object()
# apikey_rotate: the longest grace period, and how long a rotation's answer can be replayed.
ROTATION_GRACE_MAX_SECONDS = 30 * 86400
ROTATION_REPLAY = timedelta(days=1)

# Prefix collisions (10 base62 chars) are astronomically rare; a few retries suffice.
_PREFIX_ATTEMPTS = 5


def _normalize_models(models: Iterable[str] | None, *, what: str) -> list[str]:
    if models is None:
        return []
    if isinstance(models, str):
        raise ValidationError(f"{what} must be a list of model names, not a string.", code="invalid")
    result: list[str] = []
    for model in models:
        if not isinstance(model, str) or not model.strip():
            raise ValidationError(f"{what} must contain non-empty model names.", code="invalid")
        model = model.strip()
        if model not in result:
            result.append(model)
    return result


def _check_expiry(expires_at: datetime | None) -> None:
    if expires_at is not None:
        if timezone.is_naive(expires_at):
            raise ValidationError({"expires_at": "expires_at must be timezone-aware."}, code="invalid")
        if expires_at <= timezone.now():
            raise ValidationError({"expires_at": "expires_at is in the past."}, code="invalid")


def _check_name(name: str) -> None:
    if len(name) > 200:  # ApiKey.name max_length
        raise ValidationError({"name": "key name is too long (200 characters at most)."}, code="max_length")


def _audit(action: str, api_key: ApiKey, before: dict[str, object] | None) -> None:
    audit_fields(action, api_key, _AUDITED, before, tenant_id=api_key.tenant_id, label=api_key.prefix)


def apikey_create(
    *,
    tenant: Tenant,
    name: str = "",
    allowed_models: Sequence[str] | None = None,
    expires_at: datetime | None = None,
    **limits: Unpack[ApiKeyLimits],
) -> tuple[ApiKey, str]:
    """Create a key for ``tenant``; return ``(row, secret)``.

    The secret is returned once and never stored: the row holds only its prefix and
    HMAC digest. ``allowed_models`` None or empty: every model the pools serve.
    ``expires_at`` must be an aware datetime in the future. ``limits`` as in ApiKeyLimits
    (absent: unlimited, soft alerts at 80 %, monthly budget period).
    """
    models = _normalize_models(allowed_models, what="allowed models")
    cleaned = limits_clean(limits, allowed=APIKEY_LIMIT_FIELDS)
    _check_expiry(expires_at)
    _check_name(name)
    api_key = ApiKey(tenant=tenant, name=name, allowed_models=models, expires_at=expires_at)
    limits_apply(api_key, cleaned)
    limits_within_tenant(api_key)
    for _ in range(_PREFIX_ATTEMPTS):
        secret, prefix = generate_api_key()
        api_key.prefix, api_key.digest = prefix, key_digest(secret)
        try:
            with transaction.atomic():
                api_key.save()
                _audit("apikey.create", api_key, None)
        except IntegrityError:
            if ApiKey.objects.filter(prefix=prefix).exists():
                continue  # prefix collision: draw another key
            raise
        return api_key, secret
    raise RuntimeError("could not allocate a unique API key prefix")  # pragma: no cover


def apikey_revoke(*, api_key: ApiKey) -> ApiKey:
    """Revoke ``api_key`` (idempotent: an already revoked key keeps its revocation time)."""
    if api_key.revoked_at is None:
        with transaction.atomic():
            before = audit_snapshot(api_key, _AUDITED)
            api_key.revoked_at = timezone.now()
            api_key.save(update_fields=["revoked_at"])
            _audit("apikey.revoke", api_key, before)
    return api_key


def apikey_details_set(
    *,
    api_key: ApiKey,
    name: str | object = UNCHANGED,
    allowed_models: Sequence[str] | object | None = UNCHANGED,
    expires_at: datetime | object | None = UNCHANGED,
) -> ApiKey:
    """Change a key's name, allowed models (None or empty: every model) or expiry (None: never);
    a field left :data:`UNCHANGED` keeps its value. A revoked key cannot be changed."""
    if api_key.revoked_at is not None:
        raise ValidationError("this key is revoked; it cannot be changed.", code="invalid")
    updates: dict[str, object] = {}
    if name is not UNCHANGED:
        assert isinstance(name, str)
        _check_name(name)
        updates["name"] = name
    if allowed_models is not UNCHANGED:
        updates["allowed_models"] = _normalize_models(allowed_models, what="allowed models")  # type: ignore[arg-type]
    if expires_at is not UNCHANGED:
        _check_expiry(expires_at)  # type: ignore[arg-type]
        updates["expires_at"] = expires_at
    # post_save announces a change to every replica
    audited_update(
        api_key, updates, action="apikey.update", fields=_AUDITED, tenant_id=api_key.tenant_id, label=api_key.prefix
    )
    return api_key


def apikey_update(*, api_key: ApiKey, **limits: Unpack[ApiKeyLimits]) -> ApiKey:
    """Change some limits of ``api_key``: a given name is set (None: unlimited), the others kept.

    Validation as in ApiKeyLimits; the whole change is refused on any bad value. The row is
    locked while it is read and written, so concurrent updates cannot leave an inconsistent
    budget window. Saves only the changed fields; a real change is announced to every
    replica (post_save), which applies it on its next request. Returns ``api_key``, updated.
    """
    return limits_update(api_key, limits_clean(limits, allowed=APIKEY_LIMIT_FIELDS))


def _unused_key() -> tuple[str, str]:
    """A new secret whose prefix no key uses, as its current or previous prefix."""
    for _ in range(_PREFIX_ATTEMPTS):
        secret, prefix = generate_api_key()
        if not ApiKey.objects.filter(Q(prefix=prefix) | Q(previous_prefix=prefix)).exists():
            return secret, prefix
    raise RuntimeError("could not allocate a unique API key prefix")  # pragma: no cover


def apikey_rotate(*, api_key: ApiKey, grace_seconds: int = 0, idempotency_key: str = "") -> tuple[ApiKey, str]:
    """Give ``api_key`` a new secret; return ``(key, new secret)``. The key keeps its id, name,
    limits, usage and everything else.

    The old secret stays valid for ``grace_seconds`` (0 to :data:`ROTATION_GRACE_MAX_SECONDS`;
    0: refused from the next request on), on every gateway: its prefix and digest are kept as
    the key's previous ones. Rotating again ends an earlier rotation's grace at once.

    ``idempotency_key``: a retry of the last rotation with the same key and the same grace,
    within :data:`ROTATION_REPLAY`, answers the same new secret again (kept encrypted for that
    only) instead of rotating twice; the same key with another grace is refused.
    """
    if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, int):
        raise ValidationError({"grace_seconds": "a whole number of seconds."}, code="invalid")
    if not 0 <= grace_seconds <= ROTATION_GRACE_MAX_SECONDS:
        days = ROTATION_GRACE_MAX_SECONDS // 86400
        message = f"from 0 to {ROTATION_GRACE_MAX_SECONDS} seconds ({days} days)."
        raise ValidationError({"grace_seconds": message}, code="invalid")
    if len(idempotency_key) > 200:
        raise ValidationError({"idempotency_key": "200 characters at most."}, code="max_length")
    now = timezone.now()
    with transaction.atomic():
        key = ApiKey.objects.select_for_update().get(pk=api_key.pk)
        if key.revoked_at is not None:
            raise ValidationError("this key is revoked; it cannot be rotated.", code="invalid")
        replay = (
            idempotency_key
            and key.rotation_idempotency_key == idempotency_key
            and key.rotated_at is not None
            and now - key.rotated_at < ROTATION_REPLAY
            and key.rotation_secret_encrypted
        )
        if replay:
            if key.rotation_grace_seconds != grace_seconds:
                raise ValidationError(
                    "this Idempotency-Key was used for a rotation with another grace period.",
                    code="idempotency_conflict",
                )
            return key, decrypt_credential(key.rotation_secret_encrypted)
        before = audit_snapshot(key, _ROTATION_AUDITED)
        old_prefix = key.prefix
        secret, prefix = _unused_key()
        if grace_seconds:
            key.previous_prefix, key.previous_digest = key.prefix, key.digest
            key.previous_valid_until = now + timedelta(seconds=grace_seconds)
        else:
            key.previous_prefix, key.previous_digest, key.previous_valid_until = "", "", None
        key.prefix, key.digest = prefix, key_digest(secret)
        key.rotated_at = now
        key.rotation_idempotency_key = idempotency_key
        key.rotation_grace_seconds = grace_seconds
        key.rotation_secret_encrypted = encrypt_credential(secret) if idempotency_key else ""
        key.save()  # post_save announces the new prefix to every replica
        # ... and this the old one, whose cached entry every replica drops on its next request.
        config_change_record(kind=ConfigChange.KEY, prefix=old_prefix, tenant_id=key.tenant_id)
        audit_fields(
            "apikey.rotate",
            key,
            _ROTATION_AUDITED,
            before,
            tenant_id=key.tenant_id,
            label=prefix,
            secrets_changed=["secret"],
        )
    for field in (f.attname for f in ApiKey._meta.concrete_fields):
        setattr(api_key, field, getattr(key, field))
    return api_key, secret


_ROTATION_AUDITED = ("prefix", "previous_prefix", "previous_valid_until")
