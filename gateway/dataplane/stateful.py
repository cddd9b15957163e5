"""The stateful policy on the data plane: stored responses and conversations (docs/contract.md).

Only for a key whose ``KeyInfo.stateful`` is on (the key's setting, else its tenant's), and
only for a request that needs state (``store`` not false, ``previous_response_id``,
``conversation`` or ``background``): every other request takes the stateless path untouched,
without a database access. The upstream never holds state: :func:`prepare` reads the context
(the previous response's context, input and output, or the conversation's items) in a worker
thread and sends it whole with the new input and ``store: false``, so any account can serve
any turn. :class:`Recorder` wraps the client's ``send``: it puts the client's view back into
the response (``id`` of a background response, ``store``, ``previous_response_id``,
``conversation``, ``background``), and stores the response (and appends to its conversation)
before the terminal event or the JSON body reaches the client, so a next turn sent at once
finds it. :func:`stored` serves the stored-object endpoints, every read scoped by tenant
(another tenant's id is 404).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import orjson
from django.conf import settings

from gateway.conf.db import db_call
from gateway.config.snapshot import KeyInfo
from gateway.contract.errors import GatewayError, invalid_request
from gateway.dataplane.asgi_io import Receive, Scope, Send, read_body, send_json
from gateway.dataplane.auth import authenticate
from gateway.dataplane.exchange import Exchange
from gateway.dataplane.runtime import Runtime
from gateway.dataplane.usage_endpoint import requests_only
from gateway.limits.engine import rejection_error
from tenancy import selectors
from tenancy.services import stored as services

logger = logging.getLogger(__name__)

_TERMINAL = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})
# Background responses running in this process, by id (POST .../cancel cancels the task).
RUNNING: dict[str, asyncio.Task[None]] = {}
_MAX_ITEMS_PER_ADD = 20


def not_implemented() -> GatewayError:
    """The answer of a stored-object endpoint when the key's stateful policy is off (as before it existed)."""
    return GatewayError(
        501, "Stored responses and conversations are not available on this gateway yet.", code="not_implemented"
    )


@dataclass(slots=True)
class Turn:
    """What a stateful request carries besides what goes upstream."""

    store: bool
    background: bool
    previous_response_id: str | None = None
    conversation_id: str | None = None
    context: list[Any] = field(default_factory=list)
    input_items: list[Any] = field(default_factory=list)
    response_id: str = ""  # set for a background response: its id is the gateway's

    def as_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "background": self.background,
            "previous_response_id": self.previous_response_id,
            "conversation_id": self.conversation_id,
            "context": self.context,
            "input_items": self.input_items,
        }

    def patch(self, response: dict[str, Any]) -> dict[str, Any]:
        """The response as the client sees it (the upstream saw ``store: false`` and no ids)."""
        patched = {
            **response,
            "store": self.store,
            "background": self.background,
            "previous_response_id": self.previous_response_id,
            "conversation": {"id": self.conversation_id} if self.conversation_id else None,
        }
        if self.response_id:
            patched["id"] = self.response_id
        return patched


def for_upstream(items: list[Any]) -> list[Any]:
    """Stored items as context for an upstream that stores nothing: input messages lose the
    ids the gateway gave them; reasoning items without ``encrypted_content`` are left out (an
    upstream cannot resolve them without store), those with it are replayed whole."""
    out: list[Any] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "reasoning" and not item.get("encrypted_content"):
            continue
        if kind == "message" and item.get("role") != "assistant":
            item = {name: value for name, value in item.items() if name != "id"}
        out.append(item)
    return out


async def prepare(request: dict[str, Any], key: KeyInfo) -> tuple[dict[str, Any], Turn | None]:
    """Take the stateful fields out of a validated request; with state to keep, load its context.

    Returns the request to dispatch (``store: false``, the whole context in ``input``) and the
    turn, or the request alone (``None``) when it needs no state.
    """
    request = dict(request)
    previous = request.pop("previous_response_id", None)
    conversation = request.pop("conversation", None)
    store = bool(request.pop("store", True))
    background = bool(request.pop("background", None))
    request["store"] = False
    if not (store or previous or conversation or background):
        return request, None
    if background and request.get("stream"):
        raise invalid_request(
            "'background' with 'stream' is not supported; poll the response instead.", param="background"
        )
    conversation_id = conversation.get("id") if isinstance(conversation, dict) else conversation
    if previous is not None and not _possible_id(previous):
        raise GatewayError(
            400,
            "Previous response with that id not found.",
            code="previous_response_not_found",
            param="previous_response_id",
        )
    if conversation_id is not None and not _possible_id(conversation_id):
        raise _not_found("Conversation with that id not found.", "conversation")
    _refuse_nul(request.get("input"), "input")
    _refuse_nul(request.get("instructions"), "instructions")
    turn = Turn(store=store or background, background=background, previous_response_id=previous)
    if previous:
        context = await db_call(selectors.stored_response_context)(key.tenant_id, previous)
        if context is None:
            raise GatewayError(
                400,
                f"Previous response with id '{previous}' not found.",
                code="previous_response_not_found",
                param="previous_response_id",
            )
        turn.context = context
    elif conversation_id:
        items = await db_call(selectors.conversation_items_all)(key.tenant_id, conversation_id)
        if items is None:
            raise _not_found(f"Conversation with id '{conversation_id}' not found.", "conversation")
        turn.conversation_id = conversation_id
        turn.context = items
    new_input = request.get("input")
    new_items = new_input if isinstance(new_input, list) else []
    turn.input_items = [services.item_with_id(item) if isinstance(item, dict) else item for item in new_items]
    request["input"] = [*for_upstream(turn.context), *new_items]
    return request, turn


class Recorder:
    """The client's ``send`` for a stateful request: patches the response, stores it at its end."""

    def __init__(self, send: Send, turn: Turn, key: KeyInfo, model: str) -> None:
        self._send = send
        self.turn = turn
        self.key = key
        self.model = model
        self.events: list[dict[str, Any]] = []
        self._start: dict[str, Any] | None = None
        self._sse = False
        self._buffer = b""
        self.final: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers") or [])
            self._sse = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            if self._sse or message["status"] != 200:
                await self._send(message)
            else:
                self._start = message  # held: the body is rewritten (and its length changes)
            return
        if self._start is not None:
            await self._json(message)
        elif self._sse:
            await self._stream(message)
        else:
            if message.get("body"):
                self._note_error(message["body"])
            await self._send(message)

    def _note_error(self, body: bytes) -> None:
        try:
            envelope = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        error = envelope.get("error") if isinstance(envelope, dict) else None
        if isinstance(error, dict):
            self.error = {"code": error.get("code"), "message": error.get("message")}

    async def _json(self, message: dict[str, Any]) -> None:
        start, self._start = self._start, None
        assert start is not None
        body = message.get("body", b"")
        try:
            response = orjson.loads(body)
        except orjson.JSONDecodeError:
            response = None
        if isinstance(response, dict) and response.get("object") == "response":
            response = self.turn.patch(response)
            await self.save(response)
            body = orjson.dumps(response)
            headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
            start = {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        await self._send(start)
        await self._send({**message, "body": body})

    async def _stream(self, message: dict[str, Any]) -> None:
        data = self._buffer + message.get("body", b"")
        more = message.get("more_body", False)
        cut = data.rfind(b"\n\n") + 2 if more else len(data)
        complete, self._buffer = data[:cut], data[cut:]
        out: list[bytes] = []
        for frame in complete.split(b"\n\n"):
            if not frame.strip():
                continue
            out.append(await self._frame(frame) + b"\n\n")
        await self._send({**message, "body": b"".join(out)})

    async def _frame(self, frame: bytes) -> bytes:
        data = None
        for line in frame.split(b"\n"):
            if line.startswith(b"data:"):
                data = line[5:].strip()
        if not data:
            return frame
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return frame
        if not isinstance(event, dict):
            return frame
        response = event.get("response")
        if isinstance(response, dict):
            event["response"] = self.turn.patch(response)
        self.events.append(event)
        kind = str(event.get("type", "")).encode()
        if kind in _TERMINAL and isinstance(event.get("response"), dict):
            await self.save(event["response"])
        return b"event: " + kind + b"\ndata: " + orjson.dumps(event)

    async def save(self, response: dict[str, Any]) -> None:
        """Store the finished response (and its conversation's new items) before the client sees it."""
        self.final = response
        try:
            await db_call(services.stored_response_save)(
                response_id=str(response.get("id") or ""),
                tenant_id=self.key.tenant_id,
                api_key_id=self.key.key_id,
                model=self.model,
                response=response,
                events=self.events,
                turn=self.turn.as_dict(),
            )
        except Exception:
            logger.exception("could not store response %s", response.get("id"))


def queued_response(turn: Turn, request: dict[str, Any]) -> dict[str, Any]:
    """The object answering ``background: true`` at once (status ``queued``)."""
    return turn.patch(
        {
            "id": turn.response_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": "queued",
            "model": request["model"],
            "output": [],
            "error": None,
            "incomplete_details": None,
            "instructions": request.get("instructions"),
            "metadata": request.get("metadata") or {},
            "parallel_tool_calls": request.get("parallel_tool_calls", True),
            "tool_choice": request.get("tool_choice", "auto"),
            "tools": request.get("tools") or [],
            "temperature": request.get("temperature"),
            "top_p": request.get("top_p"),
            "usage": None,
        }
    )


async def start_background(
    turn: Turn, request: dict[str, Any], key: KeyInfo, run: Callable[[Send], Awaitable[None]]
) -> dict[str, Any]:
    """Store the queued response and start ``run`` (the dispatch, given a sink ``send``) in a task."""
    turn.response_id = services.new_id("resp")
    queued = queued_response(turn, request)
    await db_call(services.stored_response_queue)(
        response_id=turn.response_id,
        tenant_id=key.tenant_id,
        api_key_id=key.key_id,
        model=request["model"],
        response=queued,
        turn=turn.as_dict(),
    )
    recorder = Recorder(_discard, turn, key, request["model"])

    async def body() -> None:
        try:
            await run(recorder)
        except asyncio.CancelledError:
            pass  # POST .../cancel: the row says cancelled already
        except GatewayError as error:
            recorder.error = {"code": error.code, "message": error.message}
        except Exception:
            logger.exception("background response %s failed", turn.response_id)
            recorder.error = {"code": "server_error", "message": "The gateway failed while serving this response."}
        finally:
            RUNNING.pop(turn.response_id, None)
        if recorder.final is None:
            failed = {**queued, "status": "failed", "error": recorder.error or {"code": "upstream_error"}}
            await recorder.save(failed)

    RUNNING[turn.response_id] = asyncio.ensure_future(body())
    return queued


async def _discard(message: dict[str, Any]) -> None:
    return None


async def _never() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


never_receive: Receive = _never


# --- the stored-object endpoints ---------------------------------------------------------------


def _not_found(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(404, message, code="not_found", param=param)


# The longest id looked up; longer ones, and ids with U+0000 (which PostgreSQL refuses in a
# string), cannot exist.
MAX_ID_LENGTH = 256


def _possible_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and "\x00" not in value


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(key) or _has_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False


def _refuse_nul(value: object, param: str) -> None:
    """Content to store may not hold U+0000: PostgreSQL's ``jsonb`` cannot, and the same rule
    holds on SQLite so that a request's answer does not depend on the database."""
    if _has_nul(value):
        raise invalid_request("Stored content cannot contain the character U+0000.", param=param)


async def stored(scope: Scope, receive: Receive, send: Send, runtime: Runtime, ex: Exchange) -> None:
    """``/v1/responses/{id}[/input_items|/cancel]`` and ``/v1/conversations[/...]``."""
    await runtime.fresh_token()  # with Redis: a key or policy changed a moment ago is seen now
    await runtime.config.current()
    key = ex.key = await authenticate(scope, runtime.config.keys)
    if not key.stateful:
        raise not_implemented()
    now = time.time()
    decision = await runtime.limiter.admit(requests_only(key.scopes(now)), tokens=0, now=now)
    if not decision.allowed or decision.ticket is None:
        raise rejection_error(decision)
    runtime.limiter.settle(decision.ticket, tokens=0, micros=0)
    parts = scope["path"].split("/")[2:]  # ["responses", id, ...] or ["conversations", ...]
    if any(not _possible_id(part) for part in parts[1:2]) or any("\x00" in part for part in parts):
        raise _not_found("Invalid URL")
    query = {name: values[-1] for name, values in parse_qs(scope.get("query_string", b"").decode()).items()}
    method = scope["method"]
    tenant = key.tenant_id
    if parts[0] == "responses":
        await _responses(parts[1:], method, query, send, ex, tenant)
    else:
        await _conversations(parts[1:], method, query, scope, receive, send, ex, key)


def _method(method: str, allowed: tuple[str, ...], path: str) -> None:
    if method not in allowed:
        raise GatewayError(
            405, f"Method {method} is not allowed on {path}; use {' or '.join(allowed)}.", code="method_not_allowed"
        )


async def _reply(send: Send, ex: Exchange, body: Any) -> None:
    await send_json(send, 200, orjson.dumps(body), ex.rid)


def _page_args(query: dict[str, str]) -> tuple[int, bool, str | None]:
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        raise invalid_request("'limit' must be an integer from 1 to 100.", param="limit") from None
    if not 1 <= limit <= 100:
        raise invalid_request("'limit' must be an integer from 1 to 100.", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid_request("'order' must be 'asc' or 'desc'.", param="order")
    return limit, order == "desc", query.get("after") or None


def _listing(items: list[Any], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0].get("id") if items else None,
        "last_id": items[-1].get("id") if items else None,
        "has_more": has_more,
    }


async def _responses(
    rest: list[str], method: str, query: dict[str, str], send: Send, ex: Exchange, tenant: int
) -> None:
    response_id = rest[0] if rest else ""
    if not response_id or len(rest) > 2:
        raise _not_found("Invalid URL")
    row = await db_call(selectors.stored_response_get)(tenant, response_id)
    if row is None:
        raise _not_found(f"No response found with id '{response_id}'.")
    sub = rest[1] if len(rest) == 2 else ""
    if sub == "input_items":
        _method(method, ("GET",), "/v1/responses/{id}/input_items")
        limit, descending, after = _page_args(query)
        items = list(reversed(row.input_items)) if descending else list(row.input_items)
        if after is not None:
            ids = [item.get("id") for item in items]
            if after not in ids:
                raise _not_found(f"No item found with id '{after}'.", "after")
            items = items[ids.index(after) + 1 :]
        await _reply(send, ex, _listing(items[:limit], len(items) > limit))
    elif sub == "cancel":
        _method(method, ("POST",), "/v1/responses/{id}/cancel")
        if not row.background:
            raise invalid_request("Only responses created with 'background: true' can be cancelled.")
        cancelled = await db_call(services.stored_response_cancel)(tenant_id=tenant, response_id=response_id)
        task = RUNNING.pop(response_id, None)
        if task is not None:
            task.cancel()
        await _reply(send, ex, cancelled.response if cancelled is not None else row.response)
    elif sub:
        raise _not_found("Invalid URL")
    elif method == "DELETE":
        await db_call(services.stored_response_delete)(tenant_id=tenant, response_id=response_id)
        await _reply(send, ex, {"id": response_id, "object": "response", "deleted": True})
    else:
        _method(method, ("GET", "DELETE"), "/v1/responses/{id}")
        if query.get("stream") in ("true", "1"):
            await _replay(send, ex, row.events or _synthesized(row.response), query.get("starting_after"))
        else:
            await _reply(send, ex, row.response)


def _synthesized(response: dict[str, Any]) -> list[dict[str, Any]]:
    """Events for a response that was answered as JSON: created, each item added and done, the end."""
    status = response.get("status")
    terminal = {"incomplete": "response.incomplete", "failed": "response.failed"}.get(str(status))
    start = {**response, "status": "in_progress", "output": [], "usage": None}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": start}]
    for index, item in enumerate(response.get("output") or []):
        events.append({"type": "response.output_item.added", "output_index": index, "item": item})
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    if status in ("queued", "in_progress"):
        return events[:1]
    events.append({"type": terminal or "response.completed", "response": response})
    return events


async def _replay(send: Send, ex: Exchange, events: list[dict[str, Any]], starting_after: str | None) -> None:
    after = int(starting_after) if starting_after and starting_after.lstrip("-").isdigit() else -1
    frames = []
    for seq, event in enumerate(events):
        if seq > after:
            event = {**event, "sequence_number": seq}
            frames.append(b"event: " + str(event["type"]).encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")
    headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"x-request-id", ex.rid)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"".join(frames)})


def _conversation_object(conversation: Any) -> dict[str, Any]:
    return {
        "id": conversation.id,
        "object": "conversation",
        "created_at": int(conversation.created_at.timestamp()),
        "metadata": conversation.metadata,
    }


async def _json_body(scope: Scope, receive: Receive) -> dict[str, Any]:
    raw = await read_body(scope, receive, settings.GATEWAY_MAX_BODY_BYTES)
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise GatewayError(400, "We could not parse the JSON body of your request.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    for name, value in body.items():
        _refuse_nul(value, name)
    return body


def _metadata(body: dict[str, Any]) -> dict[str, str] | None:
    metadata = body.get("metadata")
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > 16:
        raise invalid_request("'metadata' must be an object of at most 16 string values.", param="metadata")
    for name, value in metadata.items():
        if not isinstance(value, str) or len(name) > 64 or len(value) > 512:
            raise invalid_request(
                "'metadata' values must be strings of at most 512 characters.", param=f"metadata.{name}"
            )
    return metadata


def _items(body: dict[str, Any], required: bool) -> list[dict[str, Any]]:
    items = body.get("items")
    if items is None and not required:
        return []
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise invalid_request("'items' must be an array of item objects.", param="items")
    if len(items) > _MAX_ITEMS_PER_ADD:
        raise invalid_request(f"'items' takes at most {_MAX_ITEMS_PER_ADD} items per request.", param="items")
    return items


async def _conversations(
    rest: list[str],
    method: str,
    query: dict[str, str],
    scope: Scope,
    receive: Receive,
    send: Send,
    ex: Exchange,
    key: KeyInfo,
) -> None:
    tenant = key.tenant_id
    if not rest:
        _method(method, ("POST",), "/v1/conversations")
        body = await _json_body(scope, receive)
        conversation = await db_call(_create)(tenant, key.key_id, _metadata(body), _items(body, False))
        await _reply(send, ex, _conversation_object(conversation))
        return
    conversation_id = rest[0]
    if len(rest) == 1:
        _method(method, ("GET", "POST", "DELETE"), "/v1/conversations/{id}")
        if method == "GET":
            conversation = await db_call(selectors.conversation_get)(tenant, conversation_id)
        elif method == "POST":
            metadata = _metadata(await _json_body(scope, receive)) or {}
            conversation = await db_call(_update)(tenant, conversation_id, metadata)
        else:
            if not await db_call(_delete)(tenant, conversation_id):
                raise _not_found(f"Conversation with id '{conversation_id}' not found.")
            await _reply(send, ex, {"id": conversation_id, "object": "conversation.deleted", "deleted": True})
            return
        if conversation is None:
            raise _not_found(f"Conversation with id '{conversation_id}' not found.")
        await _reply(send, ex, _conversation_object(conversation))
        return
    if rest[1] != "items" or len(rest) > 3:
        raise _not_found("Invalid URL")
    if len(rest) == 2:
        _method(method, ("GET", "POST"), "/v1/conversations/{id}/items")
        if method == "POST":
            items = _items(await _json_body(scope, receive), True)
            added = await db_call(_add)(tenant, conversation_id, items)
            if added is None:
                raise _not_found(f"Conversation with id '{conversation_id}' not found.")
            await _reply(send, ex, _listing(added, False))
            return
        limit, descending, after = _page_args(query)
        page = await db_call(_page)(tenant, conversation_id, after, limit, descending)
        if page is None:
            raise _not_found(f"Conversation with id '{conversation_id}' not found.")
        await _reply(send, ex, _listing(*page))
        return
    item_id = rest[2]
    _method(method, ("GET", "DELETE"), "/v1/conversations/{id}/items/{item_id}")
    if method == "GET":
        item = await db_call(selectors.conversation_item_get)(tenant, conversation_id, item_id)
        if item is None:
            raise _not_found(f"Item with id '{item_id}' not found.")
        await _reply(send, ex, item)
        return
    if not await db_call(_item_delete)(tenant, conversation_id, item_id):
        raise _not_found(f"Item with id '{item_id}' not found.")
    conversation = await db_call(selectors.conversation_get)(tenant, conversation_id)
    await _reply(send, ex, _conversation_object(conversation))


def _create(tenant: int, key_id: int, metadata: dict[str, str] | None, items: list[dict[str, Any]]) -> Any:
    return services.conversation_create(tenant_id=tenant, api_key_id=key_id, metadata=metadata, items=items)


def _update(tenant: int, conversation_id: str, metadata: dict[str, str]) -> Any:
    return services.conversation_update(tenant_id=tenant, conversation_id=conversation_id, metadata=metadata)


def _delete(tenant: int, conversation_id: str) -> bool:
    return services.conversation_delete(tenant_id=tenant, conversation_id=conversation_id)


def _add(tenant: int, conversation_id: str, items: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    return services.conversation_items_add(tenant_id=tenant, conversation_id=conversation_id, items=items)


def _page(tenant: int, conversation_id: str, after: str | None, limit: int, descending: bool) -> Any:
    return selectors.conversation_items_page(tenant, conversation_id, after=after, limit=limit, descending=descending)


def _item_delete(tenant: int, conversation_id: str, item_id: str) -> bool:
    return services.conversation_item_delete(tenant_id=tenant, conversation_id=conversation_id, item_id=item_id)
