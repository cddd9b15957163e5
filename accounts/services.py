"""Writes for pools and upstream accounts.

Every function validates its input and raises django.core.exceptions.ValidationError
with a human sentence on bad input (never containing a credential). Writes go through
``Model.save()`` so gateway.notify's post_save signals announce them to every replica.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.core.exceptions import ValidationError
from django.core.validators import validate_slug
from django.db import IntegrityError, transaction

from accounts.crypto import encrypt_credential
from accounts.models import DEFAULT_STRIP_FIELDS, Pool, UpstreamAccount, validate_base_url


def pool_get_or_create(*, name: str) -> Pool:
    """The pool called ``name``, created if missing. ValidationError if ``name`` is not a slug."""
    name = name.strip()
    if not name or len(name) > 64:
        raise ValidationError("pool name must be 1 to 64 characters.", code="invalid")
    try:
        validate_slug(name)
    except ValidationError:
        raise ValidationError(
            f"pool name {name!r} is not a slug: use letters, digits, '-' and '_'.", code="invalid"
        ) from None
    try:
        with transaction.atomic():
            pool, _ = Pool.objects.get_or_create(name=name)
    except IntegrityError:
        # A concurrent create won the race: the pool exists now.
        pool = Pool.objects.get(name=name)
    return pool


def _clean_base_url(base_url: str) -> str:
    url = base_url.strip().rstrip("/")
    validate_base_url(url)
    if len(url) > 500:
        raise ValidationError("base URL is too long (500 characters at most).", code="max_length")
    return url


def _clean_models(models: Iterable[str]) -> list[str]:
    if isinstance(models, str):
        raise ValidationError("models must be a list of model names, not a string.", code="invalid")
    result: list[str] = []
    for model in models:
        if not isinstance(model, str) or not model.strip():
            raise ValidationError("model names must be non-empty strings.", code="invalid")
        model = model.strip()
        if model not in result:
            result.append(model)
    if not result:
        raise ValidationError("an upstream account needs at least one model.", code="required")
    return result


def upstream_account_create(
    *,
    pool: Pool,
    base_url: str,
    api_key: str | None = None,
    models: Iterable[str] = (),
    weight: int = 1,
    name: str = "",
    enabled: bool = True,
) -> UpstreamAccount:
    """Add an account serving ``models`` at ``{base_url}/responses`` to ``pool``.

    ``base_url``: http(s) with a host; stored without trailing slash. ``models``: at
    least one non-empty name (duplicates dropped). ``weight`` >= 1. ``api_key`` None
    or blank: no Authorization header is sent; otherwise stored Fernet-encrypted.
    """
    url = _clean_base_url(base_url)
    model_list = _clean_models(models)
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise ValidationError("weight must be a whole number of at least 1.", code="min_value")
    if len(name) > 200:
        raise ValidationError("account name is too long (200 characters at most).", code="max_length")
    secret = (api_key or "").strip()
    account = UpstreamAccount(
        pool=pool,
        name=name.strip(),
        base_url=url,
        credential_encrypted=encrypt_credential(secret) if secret else "",
        models=model_list,
        weight=weight,
        enabled=enabled,
    )
    account.save()
    return account


def upstream_account_set_enabled(*, account: UpstreamAccount, enabled: bool) -> UpstreamAccount:
    """Enable or disable ``account`` (no write if unchanged)."""
    if account.enabled != enabled:
        account.enabled = enabled
        account.save(update_fields=["enabled"])
    return account


def strip_fields_clean(fields: Iterable[str] | None) -> list[str] | None:
    """Validate a pool's strip list: None (the default list) or a subset of DEFAULT_STRIP_FIELDS."""
    if fields is None:
        return None
    if isinstance(fields, str) or not isinstance(fields, Iterable):
        raise ValidationError("strip fields must be a list of field names.", code="invalid")
    value: list[str] = []
    for field in fields:
        name = field.strip() if isinstance(field, str) else field
        if name not in DEFAULT_STRIP_FIELDS:
            raise ValidationError(
                f"{name!r} is not a strippable field: choose from {', '.join(DEFAULT_STRIP_FIELDS)}.",
                code="invalid",
            )
        if name not in value:
            value.append(name)
    return value


def pool_set_strip_fields(*, pool: Pool, fields: Iterable[str] | None) -> Pool:
    """Set which top-level request fields ``pool`` strips before forwarding.

    None restores DEFAULT_STRIP_FIELDS. A list narrows it: every entry must be one of
    DEFAULT_STRIP_FIELDS (the seed contract's list); an empty list strips nothing.
    """
    value = strip_fields_clean(fields)
    if pool.strip_fields != value:
        pool.strip_fields = value
        pool.save(update_fields=["strip_fields"])
    return pool
