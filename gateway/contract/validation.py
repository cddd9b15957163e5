"""The request contract of ``POST /v1/responses`` (seed 004): validation and normalization.

``validate_request(body)`` takes the parsed JSON body, raises ``GatewayError`` (400,
type ``invalid_request_error``) on the first violation and otherwise returns a NEW request
dict. The body is never mutated: the result is a shallow copy, and only what changes is
copied (tools that are renamed, the input list when a tool message is converted); every
other value is shared by reference. ``gateway.contract.sanitize`` then shapes it for the upstream.

Checks, in this order (the first violation is the one reported):

1. the body is a JSON object (param null);
2. ``model``: required, a non-empty string;
3. option fields have their JSON type or null (code ``invalid_type``): see ``_OPTION_TYPES``,
   plus string ``metadata`` values (param ``metadata.<key>``); ``max_output_tokens`` within
   ``[MIN_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS]`` (OpenAI's codes ``integer_below_min_value`` /
   ``integer_above_max_value``);
4. ``store``: a boolean or null, never true;
5. ``previous_response_id`` (alone or with ``conversation``) and ``truncation`` are rejected;
   ``conversation`` is a string or ``{"id": str}``;
6. ``include``: an array of allowlisted strings (``[]`` is fine);
7. ``tools``: an array of objects with a string ``type``; the unsupported types are
   rejected, ``web_search_preview`` is renamed (also in the object form of ``tool_choice``);
   any other type passes untouched (clients such as Codex send their own);
8. ``fallbacks`` (gateway-only, used by routing): an array of strings (code ``invalid_type``);
9. exactly one of ``input``/``messages``, then one pass over the items (see below).

Error codes: ``invalid_type`` answers a JSON type mismatch of a top-level option field
(step 3, ``model``, ``store``, ``fallbacks``); everything else, including the structure of
``input``/``messages``/``tools``/``include``/``conversation`` and their entries, answers
``invalid_request_error`` as the seed's rules do. ``param`` always names the offending
value with a path such as ``input[2].content[0].file_id``, ``tools[1].type``, ``include[0]``.

Decisions:

- null counts as absent for every optional field, since clients serialize unset fields as
  null: ``truncation: null``, ``previous_response_id: null`` and ``conversation: null`` are
  accepted and dropped from the result; other null options are kept as they came.
- ``store`` is always ``False`` in the result: the contract's default is false while the
  upstream's is true, so an omitted ``store`` must not reach the upstream as "store".
- String ``input`` becomes one user message with one ``input_text`` part.
- ``messages`` (chat format) is coerced: system/developer texts are joined into
  ``instructions`` (the request's own ``instructions`` first, separator ``"\\n\\n"``),
  user/assistant messages become input items as they are, and the result has ``input``
  and no ``messages``.
- Tool messages (``role: "tool"``, in ``input`` or ``messages``) are converted here, not in
  sanitize, because a missing call id must be a 400 from validation:
  ``{"type": "function_call_output", "call_id": tool_call_id or call_id, "output": text}``;
  text parts are concatenated without a separator (they are pieces of one text).
- Message items are those with ``type: "message"``, or with a ``role`` and no ``type``.
  Their ``content`` must be a string or an array of objects; it may be absent or null only
  on an assistant message carrying ``tool_calls``. Those ``tool_calls`` are checked here
  (function calls with an ``id``, ``function.name`` and string or object ``arguments``) so
  that sanitize can turn them into ``function_call`` items without failing.
- ``input_file`` with a non-empty ``file_id`` is rejected both as an input item and as a
  content part of a message; ``file_url``/``file_data`` pass.
- ``web_search_preview_2025_03_11`` (the SDK's dated alias) is renamed like
  ``web_search_preview``.
- Items of types this module does not know (reasoning, function_call, item_reference,
  mcp_*, custom_tool_call, ...) and unknown top-level fields pass through untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.contract.errors import GatewayError, invalid_request

INVALID_TYPE = "invalid_type"

UNSUPPORTED_TOOL_TYPES = frozenset(
    {"file_search", "code_interpreter", "computer_use", "computer_use_preview", "image_generation"}
)
TOOL_TYPE_RENAMES = {"web_search_preview": "web_search", "web_search_preview_2025_03_11": "web_search"}
INCLUDE_ALLOWLIST = frozenset(
    {
        "code_interpreter_call.outputs",
        "computer_call_output.output.image_url",
        "file_search_call.results",
        "message.input_image.image_url",
        "message.output_text.logprobs",
        "reasoning.encrypted_content",
        "web_search_call.action.sources",
    }
)
MESSAGE_ROLES = ("user", "assistant", "system", "developer", "tool")
INSTRUCTION_ROLES = ("system", "developer")
TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
# max_output_tokens: OpenAI's minimum, and the largest value an upstream takes (int32).
MIN_OUTPUT_TOKENS = 16
MAX_OUTPUT_TOKENS = 2**31 - 1


def validate_request(body: object, stateful: bool = False) -> dict[str, Any]:
    """Check ``body`` against the contract and return the normalized request (see the module doc).

    ``stateful`` (the key's stateful policy, docs/contract.md): ``store: true`` and
    ``previous_response_id`` (a string) are accepted and ``store`` keeps the client's value
    (absent: true); gateway/dataplane/stateful.py takes them out before anything goes upstream.
    """
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    request = dict(body)
    _check_model(request.get("model"))
    _check_option_types(request)
    _check_max_output_tokens(request.get("max_output_tokens"))
    _check_store(request, stateful)
    _check_unsupported_context(request, stateful)
    _check_include(request.get("include"))
    _normalize_tools(request)
    _normalize_tool_choice(request)
    _check_fallbacks(request.get("fallbacks"))
    _normalize_input(request)
    return request


# --- JSON types ---------------------------------------------------------------------------


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _invalid_type(param: str, expected: str, value: object) -> GatewayError:
    return invalid_request(
        f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)}.",
        param=param,
        code=INVALID_TYPE,
    )


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_object(value: object) -> bool:
    return isinstance(value, dict)


def _is_str_or_object(value: object) -> bool:
    return isinstance(value, str | dict)


_STRING = (_is_str, "a string")
_BOOLEAN = (_is_bool, "a boolean")
_NUMBER = (_is_number, "a number")
_INTEGER = (_is_integer, "an integer")
_OBJECT = (_is_object, "an object")

# Option fields and their JSON type; null is accepted for all of them.
_OPTION_TYPES: dict[str, tuple[Callable[[object], bool], str]] = {
    "instructions": _STRING,
    "stream": _BOOLEAN,
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "max_output_tokens": _INTEGER,
    "max_tool_calls": _INTEGER,
    "top_logprobs": _INTEGER,
    "parallel_tool_calls": _BOOLEAN,
    "metadata": _OBJECT,
    "reasoning": _OBJECT,
    "text": _OBJECT,
    "tool_choice": (_is_str_or_object, "a string or an object"),
    "prompt_cache_key": _STRING,
    "safety_identifier": _STRING,
    "user": _STRING,
    "service_tier": _STRING,
    "stream_options": _OBJECT,
    "background": _BOOLEAN,
}


# --- top-level fields ---------------------------------------------------------------------


def _check_model(model: object) -> None:
    if model is None:
        raise invalid_request("Missing required parameter: 'model'.", param="model")
    if not isinstance(model, str):
        raise _invalid_type("model", "a string", model)
    if not model:
        raise invalid_request("'model' must be a non-empty string.", param="model")


def _check_option_types(request: dict[str, Any]) -> None:
    for field, (accepts, expected) in _OPTION_TYPES.items():
        value = request.get(field)
        if value is not None and not accepts(value):
            raise _invalid_type(field, expected, value)
    metadata = request.get("metadata")
    if metadata:
        for key, value in metadata.items():
            if not isinstance(value, str):
                raise _invalid_type(f"metadata.{key}", "a string", value)


def _check_max_output_tokens(value: int | None) -> None:
    """An integer already (step 3): within OpenAI's range, so estimates and budgets stay sane."""
    if value is None:
        return
    if value < MIN_OUTPUT_TOKENS:
        raise invalid_request(
            f"Invalid 'max_output_tokens': integer below minimum value. "
            f"Expected a value >= {MIN_OUTPUT_TOKENS}, but got {value} instead.",
            param="max_output_tokens",
            code="integer_below_min_value",
        )
    if value > MAX_OUTPUT_TOKENS:
        raise invalid_request(
            f"Invalid 'max_output_tokens': integer above maximum value. "
            f"Expected a value <= {MAX_OUTPUT_TOKENS}, but got {value} instead.",
            param="max_output_tokens",
            code="integer_above_max_value",
        )


def _check_store(request: dict[str, Any], stateful: bool = False) -> None:
    store = request.get("store")
    if store is not None and not isinstance(store, bool):
        raise _invalid_type("store", "a boolean", store)
    if stateful:
        request["store"] = store is not False
        return
    if store:
        raise invalid_request("'store: true' is not supported; set 'store' to false or omit it.", param="store")
    request["store"] = False


def _check_unsupported_context(request: dict[str, Any], stateful: bool = False) -> None:
    conversation = request.get("conversation")
    previous = request.get("previous_response_id")
    if previous is not None:
        if conversation is not None:
            raise invalid_request(
                "'conversation' and 'previous_response_id' cannot be used together.", param="previous_response_id"
            )
        if stateful:
            if not isinstance(previous, str) or not previous:
                raise _invalid_type("previous_response_id", "a string", previous)
            if request.get("truncation") is not None:
                raise invalid_request("'truncation' is not supported.", param="truncation")
            request.pop("truncation", None)
            return
        raise invalid_request(
            "'previous_response_id' is not supported; use 'conversation' for multi-turn context.",
            param="previous_response_id",
        )
    if request.get("truncation") is not None:
        raise invalid_request("'truncation' is not supported.", param="truncation")
    request.pop("previous_response_id", None)
    request.pop("truncation", None)
    if conversation is None:
        request.pop("conversation", None)
    elif isinstance(conversation, dict):
        if not isinstance(conversation.get("id"), str):
            raise invalid_request("'conversation.id' must be a string.", param="conversation.id")
    elif not isinstance(conversation, str):
        raise invalid_request("'conversation' must be a string or an object with an 'id'.", param="conversation")


def _check_include(include: object) -> None:
    if include is None:
        return
    if not isinstance(include, list):
        raise invalid_request("'include' must be an array of strings.", param="include")
    for index, value in enumerate(include):
        if not isinstance(value, str):
            raise invalid_request("'include' must be an array of strings.", param=f"include[{index}]")
        if value not in INCLUDE_ALLOWLIST:
            raise invalid_request(
                f"Invalid value for 'include[{index}]': '{value}' is not supported. "
                f"Supported values are: {', '.join(sorted(INCLUDE_ALLOWLIST))}.",
                param=f"include[{index}]",
            )


def _normalize_tools(request: dict[str, Any]) -> None:
    tools = request.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise invalid_request("'tools' must be an array of tool objects.", param="tools")
    renamed: list[Any] | None = None  # copied on the first rename only
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise invalid_request("Each tool must be an object.", param=f"tools[{index}]")
        tool_type = tool.get("type")
        if not isinstance(tool_type, str):
            raise invalid_request("Each tool must have a string 'type'.", param=f"tools[{index}].type")
        if tool_type in UNSUPPORTED_TOOL_TYPES:
            raise invalid_request(f"Tool type '{tool_type}' is not supported.", param=f"tools[{index}].type")
        new_type = TOOL_TYPE_RENAMES.get(tool_type)
        if new_type is not None:
            if renamed is None:
                renamed = list(tools)
            renamed[index] = {**tool, "type": new_type}
    if renamed is not None:
        request["tools"] = renamed


def _normalize_tool_choice(request: dict[str, Any]) -> None:
    tool_choice = request.get("tool_choice")
    if isinstance(tool_choice, dict):
        tool_type = tool_choice.get("type")
        new_type = TOOL_TYPE_RENAMES.get(tool_type) if isinstance(tool_type, str) else None
        if new_type is not None:
            request["tool_choice"] = {**tool_choice, "type": new_type}


def _check_fallbacks(fallbacks: object) -> None:
    if fallbacks is None:
        return
    if not isinstance(fallbacks, list):
        raise _invalid_type("fallbacks", "an array of strings", fallbacks)
    for index, model in enumerate(fallbacks):
        if not isinstance(model, str):
            raise _invalid_type(f"fallbacks[{index}]", "a string", model)


# --- input and messages -------------------------------------------------------------------


def _normalize_input(request: dict[str, Any]) -> None:
    input_ = request.get("input")
    messages = request.pop("messages", None)
    if input_ is not None and messages is not None:
        raise invalid_request("Provide either 'input' or 'messages', not both.", param="messages")
    if messages is not None:
        request["input"] = _coerce_messages(messages, request)
    elif isinstance(input_, str):
        request["input"] = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": input_}]}]
    elif isinstance(input_, list):
        request["input"] = _check_input_items(input_)
    elif input_ is None:
        raise invalid_request("Missing required parameter: provide 'input' or 'messages'.", param="input")
    else:
        raise invalid_request("'input' must be a string or an array of input items.", param="input")


def _check_input_items(items: list[Any]) -> list[Any]:
    converted: list[Any] | None = None  # copied on the first converted item only
    for index, item in enumerate(items):
        checked = _check_input_item(item, index)
        if checked is not item and converted is None:
            converted = items[:index]
        if converted is not None:
            converted.append(checked)
    return items if converted is None else converted


def _check_input_item(item: object, index: int) -> Any:
    if not isinstance(item, dict):
        raise invalid_request("Each input item must be an object.", param=f"input[{index}]")
    item_type = item.get("type")
    if item_type == "message" or (item_type is None and "role" in item):
        path = f"input[{index}]"
        return _check_message(item, _check_role(item, path), path)
    if item_type == "input_file":
        _reject_file_id(item, f"input[{index}]")
    return item


def _coerce_messages(messages: object, request: dict[str, Any]) -> list[Any]:
    if not isinstance(messages, list):
        raise invalid_request("'messages' must be an array of message objects.", param="messages")
    system_texts: list[str] = []
    items: list[Any] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid_request("Each message must be an object.", param=f"messages[{index}]")
        path = f"messages[{index}]"
        role = _check_role(message, path)
        if role in INSTRUCTION_ROLES:
            text = _text_of(message.get("content"), f"{path}.content")
            if text:
                system_texts.append(text)
        else:
            items.append(_check_message(message, role, path))
    if system_texts:
        instructions = request.get("instructions")
        request["instructions"] = "\n\n".join([instructions, *system_texts] if instructions else system_texts)
    return items


def _check_role(message: dict[str, Any], path: str) -> str:
    role = message.get("role")
    if not isinstance(role, str) or role not in MESSAGE_ROLES:
        raise invalid_request(
            f"Invalid value for '{path}.role': expected one of {', '.join(MESSAGE_ROLES)}.", param=f"{path}.role"
        )
    return role


def _check_message(message: dict[str, Any], role: str, path: str) -> Any:
    """Return the message unchanged, or its ``function_call_output`` form for a tool message."""
    if role == "tool":
        return _function_call_output(message, path)
    has_tool_calls = False
    if role == "assistant" and message.get("tool_calls") is not None:
        has_tool_calls = _check_tool_calls(message["tool_calls"], f"{path}.tool_calls")
    content = message.get("content")
    if isinstance(content, list):
        _check_parts(content, f"{path}.content")
    elif not isinstance(content, str) and not (content is None and has_tool_calls):
        raise invalid_request(
            "Message 'content' must be a string or an array of content parts.", param=f"{path}.content"
        )
    return message


def _check_parts(parts: list[Any], path: str) -> None:
    for index, part in enumerate(parts):
        if not isinstance(part, dict):
            raise invalid_request("Each content part must be an object.", param=f"{path}[{index}]")
        part_type = part.get("type")
        if part_type == "input_file":
            _reject_file_id(part, f"{path}[{index}]")
        elif part_type == "image_url":
            _check_chat_image(part, f"{path}[{index}]")


def _reject_file_id(file: dict[str, Any], path: str) -> None:
    file_id = file.get("file_id")
    if file_id is not None and file_id != "":
        raise invalid_request(
            "'input_file.file_id' is not supported; send the file as 'file_data' or 'file_url'.",
            param=f"{path}.file_id",
        )


def _check_chat_image(part: dict[str, Any], path: str) -> None:
    # Chat-style image part, converted to input_image by sanitize: needs a string URL.
    image = part.get("image_url")
    if isinstance(image, dict):
        if not isinstance(image.get("url"), str):
            raise invalid_request("'image_url.url' must be a string.", param=f"{path}.image_url.url")
    elif not isinstance(image, str):
        raise invalid_request("'image_url' must be a string or an object with a 'url'.", param=f"{path}.image_url")


def _check_tool_calls(calls: object, path: str) -> bool:
    """Check chat-style ``tool_calls`` of an assistant message; True when there is at least one."""
    if not isinstance(calls, list):
        raise invalid_request("'tool_calls' must be an array of tool calls.", param=path)
    for index, call in enumerate(calls):
        where = f"{path}[{index}]"
        if not isinstance(call, dict):
            raise invalid_request("Each tool call must be an object.", param=where)
        if call.get("type") not in (None, "function"):
            raise invalid_request("Only function tool calls can be replayed.", param=f"{where}.type")
        if not _is_non_empty_str(call.get("id")):
            raise invalid_request("Each tool call needs a string 'id'.", param=f"{where}.id")
        function = call.get("function")
        if not isinstance(function, dict):
            raise invalid_request("Each tool call needs a 'function' object.", param=f"{where}.function")
        if not _is_non_empty_str(function.get("name")):
            raise invalid_request("Each tool call needs a string 'function.name'.", param=f"{where}.function.name")
        if not isinstance(function.get("arguments"), str | dict):
            raise invalid_request(
                "'function.arguments' must be a JSON string or an object.", param=f"{where}.function.arguments"
            )
    return bool(calls)


def _function_call_output(message: dict[str, Any], path: str) -> dict[str, Any]:
    # tool_call_id is the chat name; call_id is accepted too (the Responses name).
    call_id = message.get("tool_call_id") or message.get("call_id")
    if not _is_non_empty_str(call_id):
        raise invalid_request("A tool message needs a string 'tool_call_id'.", param=f"{path}.tool_call_id")
    return {
        "type": "function_call_output",
        "call_id": call_id,
        "output": _text_of(message.get("content"), f"{path}.content"),
    }


def _text_of(content: object, path: str) -> str:
    """The text of a string content or of an array of text parts (concatenated)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_request("Message 'content' must be a string or an array of text parts.", param=path)
    texts: list[str] = []
    for index, part in enumerate(content):
        text = part.get("text") if isinstance(part, dict) and part.get("type") in TEXT_PART_TYPES else None
        if not isinstance(text, str):
            raise invalid_request("Only text content parts are accepted here.", param=f"{path}[{index}]")
        texts.append(text)
    return "".join(texts)


def _is_non_empty_str(value: object) -> bool:
    return isinstance(value, str) and value != ""
