"""What ``POST /v1/responses`` forwards upstream (seed 004, "Input Sanitization").

``sanitize_for_upstream(request, strip_fields)`` takes the output of
``gateway.contract.validation.validate_request`` (so its shapes are already checked; tool messages
are already ``function_call_output`` items) and returns a NEW dict; the argument is not
mutated. Only what changes is copied: unchanged items, content lists and parts are shared
by reference, so a request without chat-style messages costs one filtered dict copy and one
pass over the input list.

Rules:

- Top-level fields named in ``strip_fields`` (the pool's list, by default
  ``safety_identifier``, ``prompt_cache_retention``, ``temperature``, ``max_output_tokens``)
  are removed, and so are the gateway-only fields ``fallbacks`` and ``messages``. Everything
  else is kept, unknown fields and the top-level ``reasoning`` controls included.
- Message items (``type: "message"``, or a ``role`` and no ``type``) lose the interleaved
  reasoning keys ``reasoning_content``, ``reasoning_details``, ``tool_calls`` and
  ``function_call``, and their content parts of type ``reasoning``/``reasoning_content``/
  ``reasoning_details``. Items with another ``type`` (``reasoning`` with
  ``encrypted_content``, ``function_call``, ...) are real Responses items and pass unchanged.
- Decision: stripping an assistant's chat-style ``tool_calls`` literally would orphan the
  ``function_call_output`` that follows, which the upstream rejects; so each call becomes a
  ``{"type": "function_call", "call_id", "name", "arguments"}`` item right after the message,
  ``arguments`` given as an object being serialized to compact JSON, and the message itself
  is dropped when it had no content left. The legacy ``function_call`` key has no call id to
  pair with and is only stripped.
- Assistant content uses ``output_text``: a string becomes one ``output_text`` part, and
  ``text``/``input_text`` parts become ``output_text`` parts with the same text
  (``output_text`` and ``refusal`` parts stay). For user/system/developer messages, chat
  ``text`` parts become ``input_text`` and chat ``image_url`` parts become ``input_image``
  (``detail`` kept when given); string content stays a string.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

GATEWAY_ONLY_FIELDS = frozenset({"fallbacks", "messages"})
INTERLEAVED_KEYS = ("reasoning_content", "reasoning_details", "tool_calls", "function_call")
REASONING_PART_TYPES = frozenset({"reasoning", "reasoning_content", "reasoning_details"})
# Part types each role rewrites (or drops); every other part is kept as it is.
_ASSISTANT_REWRITES = REASONING_PART_TYPES | {"text", "input_text"}
_INPUT_REWRITES = REASONING_PART_TYPES | {"text", "image_url"}


def sanitize_for_upstream(request: dict[str, Any], strip_fields: frozenset[str]) -> dict[str, Any]:
    """The body to forward upstream for a validated ``request`` (see the module doc)."""
    upstream = {
        key: value for key, value in request.items() if key not in strip_fields and key not in GATEWAY_ONLY_FIELDS
    }
    items = upstream.get("input")
    if isinstance(items, list):
        upstream["input"] = _sanitize_items(items)
    return upstream


def _sanitize_items(items: list[Any]) -> list[Any]:
    sanitized: list[Any] = []
    for item in items:
        if isinstance(item, dict) and "role" in item and item.get("type") in (None, "message"):
            _append_message(item, sanitized)
        else:
            sanitized.append(item)
    return sanitized


def _append_message(message: dict[str, Any], out: list[Any]) -> None:
    """Append the sanitized form of ``message`` to ``out``: itself, a copy, and/or function calls."""
    is_assistant = message["role"] == "assistant"
    content = message.get("content")
    new_content = _assistant_content(content) if is_assistant else _input_content(content)
    if new_content is content and not any(key in message for key in INTERLEAVED_KEYS):
        out.append(message)
        return
    cleaned = {key: value for key, value in message.items() if key not in INTERLEAVED_KEYS}
    if "content" in message:
        cleaned["content"] = new_content
    tool_calls = message.get("tool_calls") if is_assistant else None
    # The message goes unless it is an empty shell around tool calls (None, "", or only reasoning parts).
    if not tool_calls or (content and new_content):
        out.append(cleaned)
    if tool_calls:
        out.extend(_function_call(call) for call in tool_calls)


def _assistant_content(content: Any) -> Any:
    if isinstance(content, str):
        return [{"type": "output_text", "text": content}]
    if isinstance(content, list):
        return _rewrite_parts(content, _ASSISTANT_REWRITES, _assistant_part)
    return content


def _input_content(content: Any) -> Any:
    if isinstance(content, list):
        return _rewrite_parts(content, _INPUT_REWRITES, _input_part)
    return content


def _rewrite_parts(
    parts: list[Any], rewritten_types: frozenset[str], rewrite: Callable[[dict[str, Any]], dict[str, Any] | None]
) -> list[Any]:
    """``parts`` itself when no part needs a change, else a new list with ``rewrite`` applied (None drops)."""
    rewritten: list[Any] | None = None
    for index, part in enumerate(parts):
        if part.get("type") not in rewritten_types:
            if rewritten is not None:
                rewritten.append(part)
            continue
        if rewritten is None:
            rewritten = parts[:index]
        new_part = rewrite(part)
        if new_part is not None:
            rewritten.append(new_part)
    return parts if rewritten is None else rewritten


def _assistant_part(part: dict[str, Any]) -> dict[str, Any] | None:
    if part["type"] in REASONING_PART_TYPES:
        return None
    return {"type": "output_text", "text": part.get("text")}


def _input_part(part: dict[str, Any]) -> dict[str, Any] | None:
    part_type = part["type"]
    if part_type in REASONING_PART_TYPES:
        return None
    if part_type == "text":
        return {"type": "input_text", "text": part.get("text")}
    return _input_image(part)


def _input_image(part: dict[str, Any]) -> dict[str, Any]:
    # Chat form: {"type": "image_url", "image_url": {"url", "detail"?}}; a bare URL string is accepted too.
    image = part["image_url"]
    if isinstance(image, dict):
        url, detail = image["url"], image.get("detail", part.get("detail"))
    else:
        url, detail = image, part.get("detail")
    converted = {"type": "input_image", "image_url": url}
    if detail is not None:
        converted["detail"] = detail
    return converted


def _function_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]
    arguments = function["arguments"]
    if not isinstance(arguments, str):
        # stdlib json, not orjson: it takes any parsed JSON value (orjson fails on ints beyond 64 bits).
        arguments = json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)
    return {"type": "function_call", "call_id": call["id"], "name": function["name"], "arguments": arguments}
