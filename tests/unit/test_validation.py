"""Unit tests of gateway.contract.validation: the request contract of POST /v1/responses (seed 004)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from gateway.contract.errors import GatewayError
from gateway.contract.validation import INCLUDE_ALLOWLIST, validate_request

INVALID_REQUEST = "invalid_request_error"
INVALID_TYPE = "invalid_type"


def body(**fields: Any) -> dict[str, Any]:
    """A valid minimal body with ``fields`` added or replaced."""
    return {"model": "gpt-4.1", "input": "hi", **fields}


def assert_rejected(request: object, *, param: str | None, code: str = INVALID_REQUEST) -> GatewayError:
    with pytest.raises(GatewayError) as exc_info:
        validate_request(request)
    error = exc_info.value
    assert (error.status, error.type, error.code, error.param) == (400, INVALID_REQUEST, code, param)
    return error


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


# --- the body -------------------------------------------------------------------------------


@pytest.mark.parametrize("request_body", [[], ["model"], "text", 1, 1.5, True, None])
def test_body_must_be_a_json_object(request_body: object) -> None:
    assert_rejected(request_body, param=None)


def test_returns_a_new_dict_and_never_mutates_the_body() -> None:
    request = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [_call("call_1")]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ],
        "tools": [{"type": "web_search_preview"}],
        "tool_choice": {"type": "web_search_preview"},
        "previous_response_id": None,
        "truncation": None,
    }
    snapshot = copy.deepcopy(request)
    result = validate_request(request)
    assert result is not request
    assert request == snapshot


def test_unknown_top_level_fields_pass_through_by_reference() -> None:
    extra = {"anything": [1, 2]}
    result = validate_request(body(x_client_field=extra, prompt_cache_retention="24h"))
    assert result["x_client_field"] is extra
    assert result["prompt_cache_retention"] == "24h"


def test_first_violation_is_reported_in_documented_order() -> None:
    # model (step 2) comes before types (3), store (4) and input (9).
    assert_rejected({"input": 5, "store": True, "temperature": "x"}, param="model")
    assert_rejected(
        {"model": "m", "input": 5, "store": True, "temperature": "x"}, param="temperature", code=INVALID_TYPE
    )
    assert_rejected({"model": "m", "input": 5, "store": True}, param="store")


# --- model ----------------------------------------------------------------------------------


def test_model_missing() -> None:
    error = assert_rejected({"input": "hi"}, param="model")
    assert error.message == "Missing required parameter: 'model'."


def test_model_null_counts_as_missing() -> None:
    assert_rejected({"model": None, "input": "hi"}, param="model")


def test_model_empty_string() -> None:
    assert_rejected({"model": "", "input": "hi"}, param="model")


@pytest.mark.parametrize("model", [5, ["gpt-4.1"], {"id": "gpt-4.1"}, True])
def test_model_wrong_type(model: object) -> None:
    assert_rejected({"model": model, "input": "hi"}, param="model", code=INVALID_TYPE)


# --- input / messages presence and shape ----------------------------------------------------


def test_neither_input_nor_messages() -> None:
    assert_rejected({"model": "m"}, param="input")


def test_null_input_and_null_messages_count_as_missing() -> None:
    assert_rejected({"model": "m", "input": None, "messages": None}, param="input")


def test_both_input_and_messages() -> None:
    assert_rejected({"model": "m", "input": "hi", "messages": [{"role": "user", "content": "hi"}]}, param="messages")


def test_null_messages_next_to_input_is_absent() -> None:
    result = validate_request({"model": "m", "input": "hi", "messages": None})
    assert result == {"model": "m", "input": [user("hi")], "store": False}


@pytest.mark.parametrize("input_value", [{"role": "user"}, 5, 1.5, True])
def test_input_must_be_string_or_array(input_value: object) -> None:
    assert_rejected({"model": "m", "input": input_value}, param="input")


def test_string_input_becomes_one_user_message() -> None:
    result = validate_request({"model": "gpt-4.1", "input": "Explain entanglement"})
    assert result == {
        "model": "gpt-4.1",
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Explain entanglement"}]}
        ],
        "store": False,
    }


def test_array_input_items_are_reused_by_reference() -> None:
    items = [user("a"), {"role": "assistant", "content": "b"}, {"type": "function_call_output", "call_id": "c"}]
    result = validate_request({"model": "m", "input": items})
    assert result["input"] == items
    assert all(new is old for new, old in zip(result["input"], items, strict=True))


def test_empty_input_array_is_accepted() -> None:
    assert validate_request({"model": "m", "input": []})["input"] == []


# --- messages coercion ----------------------------------------------------------------------


def test_messages_must_be_an_array() -> None:
    assert_rejected({"model": "m", "messages": {"role": "user", "content": "hi"}}, param="messages")


def test_messages_entries_must_be_objects() -> None:
    assert_rejected({"model": "m", "messages": [{"role": "user", "content": "hi"}, "hi"]}, param="messages[1]")


@pytest.mark.parametrize("role", [None, 5, "function", "model", ""])
def test_messages_role_must_be_a_known_string(role: object) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": role, "content": "b"}]
    assert_rejected({"model": "m", "messages": messages}, param="messages[1].role")


def test_messages_missing_role() -> None:
    assert_rejected({"model": "m", "messages": [{"content": "hi"}]}, param="messages[0].role")


def test_messages_are_coerced_into_instructions_and_input() -> None:
    call = _call("call_1")
    user_message = {"role": "user", "content": "What is 15 * 23?"}
    assistant_message = {"role": "assistant", "content": None, "tool_calls": [call]}
    request = {
        "model": "gpt-4.1",
        "messages": [
            {"role": "system", "content": "You are a math tutor."},
            user_message,
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            assistant_message,
            {"role": "tool", "tool_call_id": "call_1", "content": "345"},
        ],
    }
    result = validate_request(request)
    assert result == {
        "model": "gpt-4.1",
        "store": False,
        "instructions": "You are a math tutor.\n\nBe brief.",
        "input": [
            user_message,
            assistant_message,
            {"type": "function_call_output", "call_id": "call_1", "output": "345"},
        ],
    }
    assert "messages" not in result
    assert result["input"][0] is user_message
    assert result["input"][1] is assistant_message


def test_messages_system_text_goes_after_existing_instructions() -> None:
    request = {
        "model": "m",
        "instructions": "Top-level first.",
        "messages": [
            {"role": "system", "content": "A"},
            {"role": "user", "content": "q"},
            {"role": "system", "content": "B"},
        ],
    }
    result = validate_request(request)
    assert result["instructions"] == "Top-level first.\n\nA\n\nB"
    assert result["input"] == [{"role": "user", "content": "q"}]


def test_messages_without_system_keep_instructions_untouched() -> None:
    result = validate_request({"model": "m", "instructions": "keep", "messages": [{"role": "user", "content": "q"}]})
    assert result["instructions"] == "keep"


def test_messages_without_system_and_without_instructions_add_none() -> None:
    result = validate_request({"model": "m", "messages": [{"role": "user", "content": "q"}]})
    assert result == {"model": "m", "store": False, "input": [{"role": "user", "content": "q"}]}


def test_messages_system_content_parts_are_concatenated() -> None:
    system = {
        "role": "system",
        "content": [{"type": "text", "text": "Part one. "}, {"type": "input_text", "text": "Two."}],
    }
    result = validate_request({"model": "m", "messages": [system]})
    assert result["instructions"] == "Part one. Two."
    assert result["input"] == []


def test_messages_system_content_must_be_text() -> None:
    system = {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
    assert_rejected({"model": "m", "messages": [system]}, param="messages[0].content[0]")


def test_messages_system_content_must_be_present() -> None:
    assert_rejected({"model": "m", "messages": [{"role": "developer", "content": None}]}, param="messages[0].content")


def test_messages_tool_message_without_call_id() -> None:
    messages = [{"role": "user", "content": "q"}, {"role": "tool", "content": "42"}]
    assert_rejected({"model": "m", "messages": messages}, param="messages[1].tool_call_id")


def test_messages_user_content_is_checked_like_input() -> None:
    messages = [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]
    assert_rejected({"model": "m", "messages": messages}, param="messages[0].content[0].file_id")


# --- input items ----------------------------------------------------------------------------


@pytest.mark.parametrize("item", ["hello", 5, None, ["x"]])
def test_input_items_must_be_objects(item: object) -> None:
    assert_rejected({"model": "m", "input": [user("a"), item]}, param="input[1]")


@pytest.mark.parametrize("role", ["function", "model", 5, None])
def test_input_message_role_must_be_known(role: object) -> None:
    assert_rejected({"model": "m", "input": [{"role": role, "content": "x"}]}, param="input[0].role")


def test_input_typed_message_needs_a_role() -> None:
    assert_rejected({"model": "m", "input": [{"type": "message", "content": "x"}]}, param="input[0].role")


@pytest.mark.parametrize("role", ["user", "assistant", "system", "developer"])
def test_input_message_roles_accepted(role: str) -> None:
    item = {"role": role, "content": "x"}
    assert validate_request({"model": "m", "input": [item]})["input"] == [item]


@pytest.mark.parametrize("content", [5, {"type": "input_text", "text": "x"}, True])
def test_input_message_content_must_be_string_or_array(content: object) -> None:
    assert_rejected(
        {"model": "m", "input": [user("a"), {"role": "user", "content": content}]}, param="input[1].content"
    )


def test_input_user_message_content_required() -> None:
    assert_rejected({"model": "m", "input": [{"role": "user"}]}, param="input[0].content")
    assert_rejected({"model": "m", "input": [{"role": "user", "content": None}]}, param="input[0].content")


def test_input_assistant_content_may_be_null_only_with_tool_calls() -> None:
    with_calls = {"role": "assistant", "content": None, "tool_calls": [_call("call_1")]}
    assert validate_request({"model": "m", "input": [with_calls]})["input"] == [with_calls]
    without_content_key = {"role": "assistant", "tool_calls": [_call("call_1")]}
    assert validate_request({"model": "m", "input": [without_content_key]})["input"] == [without_content_key]
    assert_rejected({"model": "m", "input": [{"role": "assistant", "content": None}]}, param="input[0].content")
    empty_calls: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": []}
    assert_rejected({"model": "m", "input": [empty_calls]}, param="input[0].content")
    legacy = {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}
    assert_rejected({"model": "m", "input": [legacy]}, param="input[0].content")


def test_input_content_parts_must_be_objects() -> None:
    item = {"role": "user", "content": [{"type": "input_text", "text": "a"}, "b"]}
    assert_rejected({"model": "m", "input": [item]}, param="input[0].content[1]")


def test_input_file_id_in_a_content_part_is_rejected() -> None:
    item = {
        "role": "user",
        "content": [{"type": "input_text", "text": "read"}, {"type": "input_file", "file_id": "file-abc"}],
    }
    error = assert_rejected({"model": "m", "input": [user("a"), item]}, param="input[1].content[1].file_id")
    assert "file_id" in error.message


def test_input_file_id_as_an_input_item_is_rejected() -> None:
    items = [user("a"), user("b"), {"type": "input_file", "file_id": "file-abc"}]
    assert_rejected({"model": "m", "input": items}, param="input[2].file_id")


@pytest.mark.parametrize(
    "file_part",
    [
        {"type": "input_file", "file_url": "https://example.com/a.pdf"},
        {"type": "input_file", "file_data": "data:application/pdf;base64,AAAA", "filename": "a.pdf"},
        {"type": "input_file", "file_id": "", "file_url": "https://example.com/a.pdf"},
        {"type": "input_file", "file_id": None, "file_data": "data:application/pdf;base64,AAAA"},
    ],
)
def test_input_file_without_file_id_passes(file_part: dict[str, Any]) -> None:
    item = {"role": "user", "content": [file_part]}
    assert validate_request({"model": "m", "input": [item, file_part]})["input"] == [item, file_part]


def test_chat_image_part_needs_a_url() -> None:
    missing = {"role": "user", "content": [{"type": "image_url"}]}
    assert_rejected({"model": "m", "input": [missing]}, param="input[0].content[0].image_url")
    no_url = {"role": "user", "content": [{"type": "image_url", "image_url": {"detail": "low"}}]}
    assert_rejected({"model": "m", "input": [no_url]}, param="input[0].content[0].image_url.url")


def test_unknown_item_types_pass_through_by_reference() -> None:
    items = [
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA..."},
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "f",
            "arguments": "{}",
            "status": "completed",
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "ok"},
        {"type": "item_reference", "id": "msg_1"},
        {"type": "mcp_call", "id": "mcp_1", "server_label": "s", "name": "t", "arguments": "{}"},
        {"type": "custom_tool_call", "call_id": "call_2", "name": "apply_patch", "input": "*** Begin Patch"},
        {"type": "local_shell_call_output", "call_id": "call_3", "output": "ok"},
    ]
    result = validate_request({"model": "m", "input": items})
    assert result["input"] == items
    assert all(new is old for new, old in zip(result["input"], items, strict=True))


# --- tool messages --------------------------------------------------------------------------


def test_input_tool_message_becomes_function_call_output() -> None:
    first = user("q")
    items = [first, {"role": "tool", "tool_call_id": "call_9", "content": "sunny", "name": "weather"}]
    result = validate_request({"model": "m", "input": items})
    assert result["input"] == [first, {"type": "function_call_output", "call_id": "call_9", "output": "sunny"}]
    assert result["input"][0] is first
    assert items[1] == {"role": "tool", "tool_call_id": "call_9", "content": "sunny", "name": "weather"}


def test_tool_message_accepts_call_id() -> None:
    result = validate_request(
        {"model": "m", "input": [{"type": "message", "role": "tool", "call_id": "c", "content": ""}]}
    )
    assert result["input"] == [{"type": "function_call_output", "call_id": "c", "output": ""}]


def test_tool_message_content_parts_are_concatenated() -> None:
    content = [{"type": "text", "text": '{"a":'}, {"type": "input_text", "text": "1}"}]
    result = validate_request({"model": "m", "input": [{"role": "tool", "tool_call_id": "c", "content": content}]})
    assert result["input"] == [{"type": "function_call_output", "call_id": "c", "output": '{"a":1}'}]


@pytest.mark.parametrize("call_id", [None, "", 5])
def test_tool_message_without_a_call_id(call_id: object) -> None:
    items = [user("q"), {"role": "tool", "tool_call_id": call_id, "content": "x"}]
    assert_rejected({"model": "m", "input": items}, param="input[1].tool_call_id")


def test_tool_message_content_must_be_text() -> None:
    image = {"role": "tool", "tool_call_id": "c", "content": [{"type": "image_url", "image_url": "https://x/a.png"}]}
    assert_rejected({"model": "m", "input": [image]}, param="input[0].content[0]")
    assert_rejected({"model": "m", "input": [{"role": "tool", "tool_call_id": "c"}]}, param="input[0].content")


# --- assistant tool_calls (checked here, converted by sanitize) ------------------------------


def _call(call_id: str, arguments: object = "{}") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "get_time", "arguments": arguments}}


@pytest.mark.parametrize(
    ("tool_calls", "param"),
    [
        ({"id": "c"}, "input[0].tool_calls"),
        (["c"], "input[0].tool_calls[0]"),
        ([{**_call("c"), "type": "custom"}], "input[0].tool_calls[0].type"),
        ([{"type": "function", "function": {"name": "f", "arguments": "{}"}}], "input[0].tool_calls[0].id"),
        ([{"id": "", "function": {"name": "f", "arguments": "{}"}}], "input[0].tool_calls[0].id"),
        ([{"id": "c", "type": "function"}], "input[0].tool_calls[0].function"),
        ([{"id": "c", "function": {"arguments": "{}"}}], "input[0].tool_calls[0].function.name"),
        ([_call("a"), {"id": "c", "function": {"name": "f"}}], "input[0].tool_calls[1].function.arguments"),
        ([{"id": "c", "function": {"name": "f", "arguments": 5}}], "input[0].tool_calls[0].function.arguments"),
    ],
)
def test_assistant_tool_calls_must_be_convertible(tool_calls: object, param: str) -> None:
    item = {"role": "assistant", "content": None, "tool_calls": tool_calls}
    assert_rejected({"model": "m", "input": [item]}, param=param)


def test_assistant_tool_calls_with_object_arguments_pass() -> None:
    item = {"role": "assistant", "content": "", "tool_calls": [_call("c", {"tz": "Asia/Tokyo"})]}
    assert validate_request({"model": "m", "input": [item]})["input"] == [item]


def test_tool_calls_on_non_assistant_messages_are_not_checked() -> None:
    # Only stripped by sanitize; there is nothing to convert.
    item = {"role": "user", "content": "q", "tool_calls": "garbage"}
    assert validate_request({"model": "m", "input": [item]})["input"] == [item]


# --- tools and tool_choice ------------------------------------------------------------------


def test_tools_must_be_an_array() -> None:
    assert_rejected(body(tools={"type": "function"}), param="tools")


def test_tools_entries_must_be_objects() -> None:
    assert_rejected(body(tools=[{"type": "function", "name": "f"}, "web_search"]), param="tools[1]")


@pytest.mark.parametrize("tool", [{"name": "f"}, {"type": None}, {"type": 5}])
def test_tools_need_a_string_type(tool: dict[str, Any]) -> None:
    assert_rejected(body(tools=[tool]), param="tools[0].type")


@pytest.mark.parametrize(
    "tool_type", ["file_search", "code_interpreter", "computer_use", "computer_use_preview", "image_generation"]
)
def test_unsupported_tool_types_are_rejected(tool_type: str) -> None:
    error = assert_rejected(body(tools=[{"type": "web_search"}, {"type": tool_type}]), param="tools[1].type")
    assert tool_type in error.message


def test_web_search_preview_is_renamed_to_web_search() -> None:
    function = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    preview = {"type": "web_search_preview", "search_context_size": "low"}
    dated = {"type": "web_search_preview_2025_03_11"}
    tools = [function, preview, dated]
    result = validate_request(body(tools=tools))
    assert result["tools"] == [
        function,
        {"type": "web_search", "search_context_size": "low"},
        {"type": "web_search"},
    ]
    assert result["tools"][0] is function
    assert tools == [function, {"type": "web_search_preview", "search_context_size": "low"}, dated]


def test_tools_list_is_reused_when_nothing_is_renamed() -> None:
    tools = [{"type": "function", "name": "f"}, {"type": "web_search"}]
    assert validate_request(body(tools=tools))["tools"] is tools


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "custom", "name": "apply_patch", "format": {"type": "grammar"}},
        {"type": "local_shell"},
        {"type": "mcp", "server_label": "s", "server_url": "https://mcp.example.com"},
        {"type": "codex_private_tool", "anything": True},
    ],
)
def test_other_tool_types_pass_through(tool: dict[str, Any]) -> None:
    assert validate_request(body(tools=[tool]))["tools"][0] is tool


def test_null_tools_are_accepted() -> None:
    assert validate_request(body(tools=None))["tools"] is None


def test_tool_choice_object_web_search_preview_is_renamed() -> None:
    tool_choice = {"type": "web_search_preview"}
    result = validate_request(body(tools=[{"type": "web_search_preview"}], tool_choice=tool_choice))
    assert result["tool_choice"] == {"type": "web_search"}
    assert tool_choice == {"type": "web_search_preview"}


@pytest.mark.parametrize(
    "tool_choice", ["auto", "none", "required", {"type": "function", "name": "f"}, {"type": ["odd"]}]
)
def test_other_tool_choices_pass_through(tool_choice: object) -> None:
    assert validate_request(body(tool_choice=tool_choice))["tool_choice"] is tool_choice


# --- conversation and previous_response_id --------------------------------------------------


def test_conversation_with_previous_response_id() -> None:
    error = assert_rejected(body(conversation="conv_1", previous_response_id="resp_1"), param="previous_response_id")
    assert "conversation" in error.message


def test_previous_response_id_is_not_supported() -> None:
    error = assert_rejected(body(previous_response_id="resp_1"), param="previous_response_id")
    assert "not supported" in error.message
    assert "conversation" in error.message


def test_null_previous_response_id_is_absent() -> None:
    result = validate_request(body(previous_response_id=None, conversation="conv_1"))
    assert "previous_response_id" not in result
    assert result["conversation"] == "conv_1"


@pytest.mark.parametrize("conversation", ["conv_abc123", {"id": "conv_abc123"}])
def test_conversation_string_or_object(conversation: object) -> None:
    assert validate_request(body(conversation=conversation))["conversation"] is conversation


def test_null_conversation_is_absent() -> None:
    assert "conversation" not in validate_request(body(conversation=None))


@pytest.mark.parametrize("conversation", [5, ["conv_1"], True])
def test_conversation_wrong_shape(conversation: object) -> None:
    assert_rejected(body(conversation=conversation), param="conversation")


@pytest.mark.parametrize("conversation", [{}, {"id": 5}, {"id": None}])
def test_conversation_object_needs_a_string_id(conversation: object) -> None:
    assert_rejected(body(conversation=conversation), param="conversation.id")


# --- store ----------------------------------------------------------------------------------


def test_store_true_is_rejected() -> None:
    assert_rejected(body(store=True), param="store")


@pytest.mark.parametrize("store", ["false", 0, 1, [], {}])
def test_store_wrong_type(store: object) -> None:
    error = assert_rejected(body(store=store), param="store", code=INVALID_TYPE)
    assert error.message.startswith("Invalid type for 'store': expected a boolean, but got ")


@pytest.mark.parametrize("fields", [{"store": False}, {"store": None}, {}])
def test_store_false_null_or_omitted_becomes_false(fields: dict[str, Any]) -> None:
    assert validate_request(body(**fields))["store"] is False


# --- include --------------------------------------------------------------------------------


def test_include_empty_array_is_fine() -> None:
    assert validate_request(body(include=[]))["include"] == []


def test_include_allowlist_is_exactly_the_seed_list() -> None:
    allowed = [
        "code_interpreter_call.outputs",
        "computer_call_output.output.image_url",
        "file_search_call.results",
        "message.input_image.image_url",
        "message.output_text.logprobs",
        "reasoning.encrypted_content",
        "web_search_call.action.sources",
    ]
    assert frozenset(allowed) == INCLUDE_ALLOWLIST
    assert validate_request(body(include=allowed))["include"] == allowed


def test_include_unknown_value() -> None:
    error = assert_rejected(body(include=["reasoning.encrypted_content", "output.everything"]), param="include[1]")
    assert "output.everything" in error.message


def test_include_non_string_value() -> None:
    assert_rejected(body(include=[{"value": "reasoning.encrypted_content"}]), param="include[0]")


def test_include_must_be_an_array() -> None:
    assert_rejected(body(include="reasoning.encrypted_content"), param="include")


def test_include_null_is_absent() -> None:
    assert validate_request(body(include=None))["include"] is None


# --- truncation -----------------------------------------------------------------------------


@pytest.mark.parametrize("truncation", ["auto", "disabled", "", 0, {}])
def test_truncation_any_value_is_rejected(truncation: object) -> None:
    assert_rejected(body(truncation=truncation), param="truncation")


def test_truncation_null_is_absent() -> None:
    assert "truncation" not in validate_request(body(truncation=None))


# --- option field types ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", "0.2", "Invalid type for 'temperature': expected a number, but got a string."),
        ("temperature", True, "Invalid type for 'temperature': expected a number, but got a boolean."),
        ("top_p", [1], "Invalid type for 'top_p': expected a number, but got an array."),
        ("instructions", 5, "Invalid type for 'instructions': expected a string, but got an integer."),
        ("stream", "true", "Invalid type for 'stream': expected a boolean, but got a string."),
        ("stream", 1, "Invalid type for 'stream': expected a boolean, but got an integer."),
        ("max_output_tokens", 1.5, "Invalid type for 'max_output_tokens': expected an integer, but got a number."),
        ("max_output_tokens", True, "Invalid type for 'max_output_tokens': expected an integer, but got a boolean."),
        ("max_tool_calls", "3", "Invalid type for 'max_tool_calls': expected an integer, but got a string."),
        ("top_logprobs", 2.0, "Invalid type for 'top_logprobs': expected an integer, but got a number."),
        ("parallel_tool_calls", "no", "Invalid type for 'parallel_tool_calls': expected a boolean, but got a string."),
        ("metadata", ["a"], "Invalid type for 'metadata': expected an object, but got an array."),
        ("reasoning", "high", "Invalid type for 'reasoning': expected an object, but got a string."),
        ("text", "json", "Invalid type for 'text': expected an object, but got a string."),
        ("tool_choice", 1, "Invalid type for 'tool_choice': expected a string or an object, but got an integer."),
        ("tool_choice", ["auto"], "Invalid type for 'tool_choice': expected a string or an object, but got an array."),
        ("prompt_cache_key", 1, "Invalid type for 'prompt_cache_key': expected a string, but got an integer."),
        ("safety_identifier", {}, "Invalid type for 'safety_identifier': expected a string, but got an object."),
        ("user", 1, "Invalid type for 'user': expected a string, but got an integer."),
        ("service_tier", True, "Invalid type for 'service_tier': expected a string, but got a boolean."),
        ("stream_options", True, "Invalid type for 'stream_options': expected an object, but got a boolean."),
        ("background", "false", "Invalid type for 'background': expected a boolean, but got a string."),
    ],
)
def test_option_field_wrong_type(field: str, value: object, message: str) -> None:
    error = assert_rejected(body(**{field: value}), param=field, code=INVALID_TYPE)
    assert error.message == message


def test_metadata_values_must_be_strings() -> None:
    error = assert_rejected(body(metadata={"a": "1", "b": 2}), param="metadata.b", code=INVALID_TYPE)
    assert error.message == "Invalid type for 'metadata.b': expected a string, but got an integer."


def test_null_is_accepted_for_optional_fields() -> None:
    nulls = dict.fromkeys(
        [
            "instructions",
            "stream",
            "temperature",
            "top_p",
            "max_output_tokens",
            "max_tool_calls",
            "top_logprobs",
            "parallel_tool_calls",
            "metadata",
            "reasoning",
            "text",
            "tool_choice",
            "prompt_cache_key",
            "safety_identifier",
            "user",
            "service_tier",
            "stream_options",
            "background",
            "tools",
            "include",
            "fallbacks",
        ]
    )
    result = validate_request(body(**nulls))
    assert result == {"model": "gpt-4.1", "input": [user("hi")], "store": False, **nulls}


def test_valid_option_values_are_kept() -> None:
    options = {
        "instructions": "be nice",
        "stream": True,
        "temperature": 0,
        "top_p": 0.5,
        "max_output_tokens": 100,
        "max_tool_calls": 3,
        "top_logprobs": 2,
        "parallel_tool_calls": False,
        "metadata": {"k": "v"},
        "reasoning": {"effort": "high", "summary": "auto"},
        "text": {"format": {"type": "text"}, "verbosity": "low"},
        "tool_choice": "auto",
        "prompt_cache_key": "pk",
        "safety_identifier": "sid",
        "user": "u",
        "service_tier": "auto",
        "stream_options": {"include_obfuscation": False},
        "background": False,
    }
    result = validate_request(body(**options))
    assert result == {"model": "gpt-4.1", "input": [user("hi")], "store": False, **options}


# --- fallbacks ------------------------------------------------------------------------------


def test_fallbacks_are_kept() -> None:
    fallbacks = ["gpt-4.1-mini", "gpt-4o"]
    assert validate_request(body(fallbacks=fallbacks))["fallbacks"] is fallbacks


def test_fallbacks_must_be_an_array() -> None:
    error = assert_rejected(body(fallbacks="gpt-4o"), param="fallbacks", code=INVALID_TYPE)
    assert error.message == "Invalid type for 'fallbacks': expected an array of strings, but got a string."


def test_fallbacks_entries_must_be_strings() -> None:
    assert_rejected(body(fallbacks=["gpt-4o", None]), param="fallbacks[1]", code=INVALID_TYPE)


# --- what real clients send -----------------------------------------------------------------


def test_agents_sdk_replay_passes_unchanged() -> None:
    items = [
        {"content": "What time is it in Tokyo?", "role": "user"},
        {"id": "rs_1", "summary": [], "type": "reasoning", "encrypted_content": "gAAAAB..."},
        {
            "arguments": '{"timezone":"Asia/Tokyo"}',
            "call_id": "call_1",
            "name": "get_time",
            "type": "function_call",
            "id": "fc_1",
            "status": "completed",
        },
        {"call_id": "call_1", "output": "10:00", "type": "function_call_output"},
        {
            "id": "msg_1",
            "content": [{"annotations": [], "text": "It is 10:00.", "type": "output_text", "logprobs": []}],
            "role": "assistant",
            "status": "completed",
            "type": "message",
        },
    ]
    request = {
        "model": "gpt-5.2",
        "input": items,
        "include": [],
        "tools": [{"type": "function", "name": "get_time", "parameters": {}, "strict": True}],
        "stream": False,
        "store": False,
        "top_logprobs": None,
        "truncation": None,
    }
    result = validate_request(request)
    expected = {key: value for key, value in request.items() if key != "truncation"}
    assert result == expected
    assert result["input"] is items


def test_codex_request_passes_unchanged() -> None:
    request = {
        "model": "gpt-5-codex",
        "instructions": "You are Codex.",
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<env/>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "fix the bug"}]},
        ],
        "tools": [
            {"type": "function", "name": "shell", "parameters": {"type": "object"}, "strict": False},
            {
                "type": "custom",
                "name": "apply_patch",
                "format": {"type": "grammar", "syntax": "lark", "definition": ""},
            },
            {"type": "web_search"},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199-session",
        "text": {"verbosity": "low"},
        "client_metadata": {"originator": "codex_cli_rs"},
    }
    assert validate_request(request) == request


# --- max_output_tokens range ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (-5, "integer_below_min_value"),
        (0, "integer_below_min_value"),
        (15, "integer_below_min_value"),
        (2**31, "integer_above_max_value"),
        (2**63, "integer_above_max_value"),
    ],
)
def test_max_output_tokens_out_of_range_is_rejected(value: int, code: str) -> None:
    error = assert_rejected(body(max_output_tokens=value), param="max_output_tokens", code=code)
    assert str(value) in error.message


@pytest.mark.parametrize("value", [16, 4096, 2**31 - 1])
def test_max_output_tokens_in_range_is_kept(value: int) -> None:
    assert validate_request(body(max_output_tokens=value))["max_output_tokens"] == value
