"""Writes of the stateful policy: stored responses, conversations and their items.

Every function takes the tenant's id and touches only that tenant's rows: a response or
conversation of another tenant is "not found" (None / False), never an error that tells it
exists. The data plane calls these in a worker thread (gateway/conf/db.py ``db_call``); the
reads are in tenancy/selectors.py.

Appends to a conversation never interleave: the conversation row is locked (``select_for_update``
on PostgreSQL) and its ``next_position`` bumped by an UPDATE as the transaction's first write,
which on SQLite takes the database's write lock before the positions are read, so two turns
racing on one conversation append their items one after the other.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import F

from tenancy.models import ApiKey, Conversation, ConversationItem, StoredResponse, Tenant

# Statuses after which a response changes no more.
FINAL_STATUSES = frozenset({"completed", "failed", "incomplete", "cancelled"})


def new_id(prefix: str) -> str:
    """A fresh object id such as ``conv_<48 hex>``."""
    return f"{prefix}_{os.urandom(24).hex()}"


def item_with_id(item: dict[str, Any]) -> dict[str, Any]:
    """``item`` as it is stored and listed: a message gets ``type`` and parts, every item an ``id``."""
    stored = dict(item)
    if stored.get("type") is None and "role" in stored:
        stored["type"] = "message"
    if stored.get("type") == "message":
        content = stored.get("content")
        if isinstance(content, str):
            kind = "output_text" if stored.get("role") == "assistant" else "input_text"
            part: dict[str, Any] = {"type": kind, "text": content}
            if kind == "output_text":
                part["annotations"] = []
            stored["content"] = [part]
        stored.setdefault("status", "completed")
        stored.setdefault("id", new_id("msg"))
    elif not stored.get("id"):
        stored["id"] = new_id("item")
    return stored


def conversation_create(
    *, tenant_id: int, api_key_id: int, metadata: dict[str, str] | None, items: Sequence[dict[str, Any]] = ()
) -> Conversation:
    """A new conversation of the tenant, with its first ``items`` (given ids)."""
    with transaction.atomic():
        conversation = Conversation.objects.create(
            id=new_id("conv"), tenant_id=tenant_id, api_key_id=api_key_id, metadata=metadata or {}
        )
        if items:
            _append(conversation.pk, [item_with_id(item) for item in items])
    conversation.refresh_from_db()
    return conversation


def conversation_update(*, tenant_id: int, conversation_id: str, metadata: dict[str, str]) -> Conversation | None:
    """Replace the conversation's metadata; None when the tenant has no such conversation."""
    updated = Conversation.objects.filter(tenant_id=tenant_id, pk=conversation_id).update(metadata=metadata)
    return Conversation.objects.filter(tenant_id=tenant_id, pk=conversation_id).first() if updated else None


def conversation_delete(*, tenant_id: int, conversation_id: str) -> bool:
    """Delete the conversation and its items; False when the tenant has no such conversation."""
    deleted, _ = Conversation.objects.filter(tenant_id=tenant_id, pk=conversation_id).delete()
    return deleted > 0


def conversation_items_add(
    *, tenant_id: int, conversation_id: str, items: Sequence[dict[str, Any]]
) -> list[dict[str, Any]] | None:
    """Append ``items`` (given ids) to the conversation; None when the tenant has no such conversation."""
    if not Conversation.objects.filter(tenant_id=tenant_id, pk=conversation_id).exists():
        return None
    stored = [item_with_id(item) for item in items]
    with transaction.atomic():
        _append(conversation_id, stored)
    return stored


def conversation_item_delete(*, tenant_id: int, conversation_id: str, item_id: str) -> bool:
    """Delete one item of the tenant's conversation; False when either is unknown."""
    deleted, _ = ConversationItem.objects.filter(
        conversation__tenant_id=tenant_id, conversation_id=conversation_id, item_id=item_id
    ).delete()
    return deleted > 0


def _append(conversation_id: str, items: Sequence[dict[str, Any]]) -> None:
    """Append ``items`` at the end of the conversation, in one block (inside a transaction)."""
    # The UPDATE first: it takes the row's (PostgreSQL) or the database's (SQLite) write lock
    # before the positions are read, so a racing append waits for this one to commit.
    Conversation.objects.filter(pk=conversation_id).update(next_position=F("next_position") + len(items))
    locked = Conversation.objects.select_for_update().only("next_position").get(pk=conversation_id)
    start = locked.next_position - len(items)
    ConversationItem.objects.bulk_create(
        ConversationItem(conversation_id=conversation_id, position=start + i, item_id=str(item["id"]), item=item)
        for i, item in enumerate(items)
    )


def stored_response_queue(
    *, response_id: str, tenant_id: int, api_key_id: int, model: str, response: dict[str, Any], turn: dict[str, Any]
) -> StoredResponse:
    """The row of a background response, ``queued`` until :func:`stored_response_save` completes it."""
    return StoredResponse.objects.create(
        id=response_id,
        tenant_id=tenant_id,
        api_key_id=api_key_id,
        model=model,
        status=str(response.get("status") or "queued"),
        background=True,
        previous_response_id=turn.get("previous_response_id") or "",
        conversation_id=turn.get("conversation_id") or "",
        context=turn.get("context") or [],
        input_items=turn.get("input_items") or [],
        response=response,
    )


def stored_response_save(
    *,
    response_id: str,
    tenant_id: int,
    api_key_id: int,
    model: str,
    response: dict[str, Any],
    events: list[dict[str, Any]],
    turn: dict[str, Any],
) -> bool:
    """Record a finished response: its conversation's new items and, when ``turn["store"]``, the row.

    ``turn``: ``previous_response_id``, ``conversation_id``, ``context``, ``input_items``,
    ``store``, ``background``. A background response cancelled meanwhile stays cancelled
    (False is returned and nothing is written).
    """
    output = response.get("output")
    output = [item for item in output if isinstance(item, dict)] if isinstance(output, list) else []
    status = str(response.get("status") or "completed")
    with transaction.atomic():
        if turn.get("background"):
            row = StoredResponse.objects.select_for_update().filter(tenant_id=tenant_id, pk=response_id).first()
            if row is None or row.status in FINAL_STATUSES:
                return False
        conversation_id = turn.get("conversation_id")
        if conversation_id and status in ("completed", "incomplete"):
            _append(conversation_id, [*turn.get("input_items", []), *output])
        if not turn.get("store"):
            return True
        StoredResponse.objects.update_or_create(
            pk=response_id,
            defaults={
                "tenant_id": tenant_id,
                "api_key_id": api_key_id,
                "model": model,
                "status": status,
                "background": bool(turn.get("background")),
                "previous_response_id": turn.get("previous_response_id") or "",
                "conversation_id": conversation_id or "",
                "context": turn.get("context") or [],
                "input_items": turn.get("input_items") or [],
                "output": output,
                "response": response,
                "events": events,
            },
        )
    return True


def stored_response_cancel(*, tenant_id: int, response_id: str) -> StoredResponse | None:
    """Cancel a background response still queued or in progress; the row as it is now (None: unknown)."""
    with transaction.atomic():
        row = StoredResponse.objects.select_for_update().filter(tenant_id=tenant_id, pk=response_id).first()
        if row is None:
            return None
        if row.background and row.status not in FINAL_STATUSES:
            row.status = "cancelled"
            row.response = {**row.response, "status": "cancelled"}
            row.save(update_fields=["status", "response"])
    return row


def stored_response_delete(*, tenant_id: int, response_id: str) -> bool:
    """Delete the tenant's stored response; False when it has none with that id."""
    deleted, _ = StoredResponse.objects.filter(tenant_id=tenant_id, pk=response_id).delete()
    return deleted > 0


def stored_objects_purge(*, tenant: Tenant, api_key: ApiKey | None = None) -> dict[str, int]:
    """Delete the stored responses and conversations of ``tenant`` (only those of ``api_key`` if given)."""
    scope: dict[str, Any] = {"tenant": tenant}
    if api_key is not None:
        scope["api_key"] = api_key
    responses, _ = StoredResponse.objects.filter(**scope).delete()
    conversations = Conversation.objects.filter(**scope)
    count = conversations.count()
    conversations.delete()
    return {"responses": responses, "conversations": count}


def stored_objects_expire(*, tenant_ids: Iterable[int], before: datetime) -> dict[str, int]:
    """Delete the stored responses and conversations of ``tenant_ids`` created before ``before``."""
    ids = list(tenant_ids)
    responses, _ = StoredResponse.objects.filter(tenant_id__in=ids, created_at__lt=before).delete()
    conversations = Conversation.objects.filter(tenant_id__in=ids, created_at__lt=before)
    count = conversations.count()
    conversations.delete()
    return {"responses": responses, "conversations": count}
