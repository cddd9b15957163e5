"""The audit hook: services announce each change here; who made it travels in a context variable.

Both sides' services (tenancy and accounts) call :func:`audit_change` inside the transaction of
the write they make, with ``before`` and ``after`` snapshots from :func:`audit_snapshot`. This
module is the lowest layer, so it stores nothing itself: it sends :data:`changed`, and the
demand side (``tenancy.audit``) writes the append-only ``AuditEntry``. A failed write rolls the
entry back with it, since the receiver runs in the caller's transaction.

The actor is whoever is acting in the current context: the management API's base view and the
console set it per request, a manage.py command per run (``with acting_as(Actor.command(...))``);
with none set, the change is the system's (Celery, data migrations).

Secrets never reach a snapshot: a secret field is ``"[secret]"`` when it is set, and
``"[changed]"`` in ``after`` when the write replaced it; a value, even hashed, is never recorded.
"""

from __future__ import annotations

import contextvars
import getpass
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from django.db import models, transaction
from django.dispatch import Signal

SECRET_SET = "[secret]"
SECRET_CHANGED = "[changed]"

# Sent by audit_change with keyword arguments: action, target_type, target_id, target_label,
# tenant_id, before, after, actor (an Actor). tenancy.audit connects the receiver that stores it.
changed = Signal()


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes the changes of the current context. ``user_id`` None: not a person (system)."""

    source: str  # "api", "console", "command" or "system"
    label: str  # username, or the command's OS user, or "system"
    user_id: int | None = None
    token_prefix: str = ""  # the personal access token's visible prefix, when one was used
    ip: str | None = None
    request_id: str = ""

    @classmethod
    def command(cls, name: str) -> Actor:
        """The actor of a manage.py command run by the current OS user."""
        try:
            who = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry (containers)
            who = "unknown"
        return cls(source="command", label=f"{who} (manage.py {name})")


SYSTEM = Actor(source="system", label="system")
_actor: contextvars.ContextVar[Actor] = contextvars.ContextVar("audit_actor", default=SYSTEM)


def current_actor() -> Actor:
    return _actor.get()


@contextmanager
def acting_as(actor: Actor) -> Iterator[Actor]:
    """Attribute the changes made inside the block to ``actor``."""
    token = _actor.set(actor)
    try:
        yield actor
    finally:
        _actor.reset(token)


def set_actor(actor: Actor) -> contextvars.Token[Actor]:
    """Attribute later changes of this context to ``actor``; undo with :func:`reset_actor`."""
    return _actor.set(actor)


def reset_actor(token: contextvars.Token[Actor]) -> None:
    _actor.reset(token)


def _plain(value: Any) -> Any:
    """A JSON-safe copy of a field's value (decimals and times as strings)."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, models.Model):
        return value.pk
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def audit_snapshot(obj: models.Model, fields: Iterable[str], *, secret: Iterable[str] = ()) -> dict[str, Any]:
    """The values of ``fields`` of ``obj`` for an audit entry; ``secret`` fields only as
    :data:`SECRET_SET` (or None when empty). A foreign key is recorded by its id."""
    snapshot: dict[str, Any] = {}
    for name in fields:
        field = obj._meta.get_field(name)
        attname = getattr(field, "attname", name)
        snapshot[name] = _plain(getattr(obj, attname))
    for name in secret:
        snapshot[name] = SECRET_SET if getattr(obj, name) else None
    return snapshot


def audit_change(
    action: str,
    *,
    target: models.Model,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    tenant_id: int | None = None,
    label: str = "",
    secrets_changed: Iterable[str] = (),
) -> None:
    """Record that ``action`` (``"<entity>.<verb>"``) changed ``target``.

    Call it inside the write's transaction. ``before`` None: created; ``after`` None: deleted.
    Only the fields that differ are kept (both sides), so an entry shows the change itself;
    ``secrets_changed`` names secret fields the write replaced (recorded as
    :data:`SECRET_CHANGED`, never with a value). ``tenant_id`` scopes the entry for tenant
    admins; ``label`` is a human name of the target (a slug, a key prefix), never a secret.
    """
    if before is not None and after is not None:
        keys = [k for k in after if before.get(k) != after.get(k)]
        before = {k: before.get(k) for k in keys}
        after = {k: after[k] for k in keys}
        for name in secrets_changed:
            before.setdefault(name, SECRET_SET)
            after[name] = SECRET_CHANGED
        if not after:
            return  # nothing changed: nothing to record
    elif after is not None:
        after = dict(after)
        for name in secrets_changed:
            after[name] = SECRET_CHANGED
    changed.send(
        sender=type(target),
        action=action,
        target_type=target._meta.model_name or type(target).__name__.lower(),
        target_id=str(target.pk),
        target_label=label or str(target.pk),
        tenant_id=tenant_id,
        before=before,
        after=after,
        actor=current_actor(),
    )


def audit_fields(
    action: str,
    obj: models.Model,
    fields: Iterable[str],
    before: dict[str, Any] | None,
    *,
    tenant_id: int | None = None,
    label: str = "",
    secrets_changed: Iterable[str] = (),
) -> None:
    """:func:`audit_change` with ``after`` the snapshot of ``fields`` of ``obj`` now (``before``
    None: created)."""
    after, secrets = audit_snapshot(obj, fields), secrets_changed
    audit_change(
        action, target=obj, before=before, after=after, tenant_id=tenant_id, label=label, secrets_changed=secrets
    )


def audited_update(
    obj: models.Model,
    updates: dict[str, Any],
    *,
    action: str,
    fields: Iterable[str],
    tenant_id: int | None,
    label: str,
) -> list[str]:
    """Set ``updates`` on ``obj``, save the fields that changed and record the change (before
    and after of ``fields``), in one transaction; return the changed fields (none: no write)."""
    changed = [name for name, value in updates.items() if getattr(obj, name) != value]
    if changed:
        fields = tuple(fields)
        with transaction.atomic():
            before = audit_snapshot(obj, fields)
            for name in changed:
                setattr(obj, name, updates[name])
            obj.save(update_fields=changed)
            audit_fields(action, obj, fields, before, tenant_id=tenant_id, label=label)
    return changed
