"""Reads of pools and upstream accounts that other layers depend on."""

from __future__ import annotations

import logging
from typing import Any

from accounts.crypto import CredentialDecryptError, decrypt_credential
from accounts.models import UpstreamAccount

logger = logging.getLogger(__name__)


def accounts_for_snapshot() -> list[dict[str, Any]]:
    """Every upstream account with its pool, as plain dicts, in one query.

    Keys: ``id, pool_id, pool_name, name, provider, base_url, models, weight,
    enabled, strip_fields, credential, created_at``. ``credential`` is the decrypted
    upstream API key (str) or None. ``strip_fields`` is the pool's effective list.

    Disabled accounts are included with ``enabled=False`` and ``credential=None``
    (never decrypted), so the gateway can tell "model served by a disabled account"
    (503) from "unknown model" (404). An enabled account whose credential cannot be
    decrypted (GATEWAY_ENCRYPTION_KEY changed) is reported as disabled and logged by
    id: sending it without its key would only earn 401s from the upstream.
    """
    rows: list[dict[str, Any]] = []
    for account in UpstreamAccount.objects.select_related("pool").order_by("id"):
        enabled = account.enabled
        credential: str | None = None
        if enabled and account.credential_encrypted:
            try:
                credential = decrypt_credential(account.credential_encrypted)
            except CredentialDecryptError:
                logger.error(
                    "upstream account %s: credential cannot be decrypted with the current "
                    "GATEWAY_ENCRYPTION_KEY; account left out until it is re-entered",
                    account.pk,
                )
                enabled = False
        rows.append(
            {
                "id": account.pk,
                "pool_id": account.pool_id,
                "pool_name": account.pool.name,
                "name": account.name,
                "provider": account.provider,
                "base_url": account.base_url,
                "models": list(account.models),
                "weight": account.weight,
                "enabled": enabled,
                "strip_fields": account.pool.effective_strip_fields(),
                "credential": credential,
                "created_at": account.created_at,
            }
        )
    return rows
