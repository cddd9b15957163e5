"""The audit log's writer: stores each change that a service announces (accounts.infra.audit).

Connected in TenancyConfig.ready. The entry is written in the service's transaction, so it
exists exactly when the change does. Reads are in tenancy.selectors (scoped by tenant).
"""

from __future__ import annotations

from typing import Any

from accounts.infra.audit import Actor
from tenancy.models import AuditEntry


def audit_entry_store(
    *,
    action: str,
    target_type: str,
    target_id: str,
    target_label: str,
    tenant_id: int | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    actor: Actor,
    **_: Any,
) -> None:
    """The receiver of ``accounts.infra.audit.changed``: one AuditEntry per change."""
    AuditEntry.objects.create(
        actor_id=actor.user_id,
        actor_label=actor.label[:200],
        token_prefix=actor.token_prefix,
        source=actor.source,
        ip=actor.ip,
        request_id=actor.request_id[:64],
        tenant_id=tenant_id,
        action=action,
        target_type=target_type,
        target_id=target_id[:64],
        target_label=target_label[:200],
        before=before,
        after=after,
    )
