"""Unit tests of gateway.contract.sanitize: what POST /v1/responses forwards upstream (seed 004)."""

from __future__ import annotations

import copy
from typing import Any

from gateway.contract.sanitize import sanitize_for_upstream
from gateway.contract.validation import validate_request

DEFAULT_STRIP = frozenset({"safety_identifier", "prompt_cache_retention", "temperature", "max_output_tokens"})
NO_STRIP: frozenset[str] = frozenset()


def sanitize_input(*items: Any) -> list[Any]:
    return sanitize_for_upstream({"model": "m", "input": list(items)}, NO_STRIP)["input"]


def call(call_id: str, name: str = "get_time", arguments: object = '{"tz":"Asia/Tokyo"}') -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def function_call(call_id: str, name: str = "get_time", arguments: str = '{"tz":"Asia/Tokyo"}') -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments}


# --- top-level fields -----------------------------------------------------------------------


def test_default_strip_fields_are_removed() -> None:
    request = {
        "model": "m",
        "input": [],
        "safety_identifier": "sid",
        "prompt_cache_retention": "24h",
        "temperature": 0.2,
        "max_output_tokens": 100,
        "top_p": 0.9,
    }
    assert sanitize_for_upstream(request, DEFAULT_STRIP) == {"model": "m", "input": [], "top_p": 0.9}


def test_strip_fields_come_from_the_caller() -> None:
    request = {"model": "m", "input": [], "temperature": 0.2, "max_output_tokens": 100, "user": "u"}
    assert sanitize_for_upstream(request, frozenset({"user"})) == {
        "model": "m",
        "input": [],
        "temperature": 0.2,
        "max_output_tokens": 100,
    }
    assert sanitize_for_upstream(request, NO_STRIP) == request


def test_gateway_only_fields_never_go_upstream() -> None:
    request = {"model": "m", "input": [], "fallbacks": ["gpt-4o"], "messages": [{"role": "user", "content": "x"}]}
    assert sanitize_for_upstream(request, NO_STRIP) == {"model": "m", "input": []}


def test_forwarded_fields_are_kept_by_reference() -> None:
    request = {
        "model": "m",
        "input": [],
        "stream": True,
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "pk",
        "reasoning": {"effort": "high", "summary": "auto"},
        "text": {"format": {"type": "text"}},
        "tools": [{"type": "function", "name": "f"}],
        "tool_choice": {"type": "function", "name": "f"},
        "metadata": {"k": "v"},
        "instructions": "sys",
        "conversation": "conv_1",
        "client_metadata": {"originator": "codex_cli_rs"},
    }
    result = sanitize_for_upstream(request, DEFAULT_STRIP)
    assert result == request
    assert all(result[key] is value for key, value in request.items() if key != "input")


def test_returns_a_new_dict_and_never_mutates_the_request() -> None:
    request = {
        "model": "m",
        "temperature": 1,
        "fallbacks": ["x"],
        "input": [
            {"role": "user", "content": [{"type": "text", "text": "q"}], "reasoning_content": "hmm"},
            {"role": "assistant", "content": "a", "tool_calls": [call("call_1", arguments={"a": 1})]},
            {"type": "function_call_output", "call_id": "call_1", "output": "ok"},
        ],
    }
    snapshot = copy.deepcopy(request)
    result = sanitize_for_upstream(request, DEFAULT_STRIP)
    assert result is not request
    assert result["input"] is not request["input"]
    assert request == snapshot


def test_common_case_reuses_every_item() -> None:
    items = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "env"}]},
        {"role": "user", "content": "question"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA"},
        {"type": "function_call", "id": "fc_1", "call_id": "c", "name": "f", "arguments": "{}", "status": "completed"},
        {"type": "function_call_output", "call_id": "c", "output": "ok"},
        {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "hi", "annotations": []}, {"type": "refusal", "refusal": "no"}],
        },
    ]
    result = sanitize_input(*items)
    assert result == items
    assert all(new is old for new, old in zip(result, items, strict=True))


# --- interleaved reasoning removal ----------------------------------------------------------


def test_interleaved_reasoning_keys_are_stripped_from_messages() -> None:
    result = sanitize_input(
        {"role": "user", "content": "q", "reasoning_content": "x", "reasoning_details": [{"type": "reasoning.text"}]},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "a"}],
            "reasoning_content": "y",
        },
    )
    assert result == [
        {"role": "user", "content": "q"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
    ]


def test_legacy_function_call_is_stripped_without_conversion() -> None:
    message = {"role": "assistant", "content": "calling", "function_call": {"name": "f", "arguments": "{}"}}
    assert sanitize_input(message) == [{"role": "assistant", "content": [{"type": "output_text", "text": "calling"}]}]


def test_tool_calls_on_non_assistant_messages_are_only_stripped() -> None:
    message = {"role": "user", "content": "q", "tool_calls": [call("call_1")], "function_call": None}
    assert sanitize_input(message) == [{"role": "user", "content": "q"}]


def test_reasoning_content_parts_are_dropped() -> None:
    result = sanitize_input(
        {
            "role": "user",
            "content": [
                {"type": "reasoning", "text": "r"},
                {"type": "input_text", "text": "q"},
                {"type": "reasoning_content", "text": "r"},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "reasoning_details", "text": "r"},
                {"type": "output_text", "text": "a", "annotations": []},
            ],
        },
    )
    assert result == [
        {"role": "user", "content": [{"type": "input_text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "a", "annotations": []}]},
    ]


def test_top_level_reasoning_controls_are_preserved() -> None:
    request = {"model": "m", "input": [], "reasoning": {"effort": "high", "summary": "concise"}}
    assert sanitize_for_upstream(request, DEFAULT_STRIP) == request


def test_responses_reasoning_and_function_call_items_are_untouched() -> None:
    reasoning = {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [{"type": "summary_text", "text": "thinking"}],
        "encrypted_content": "gAAAAB...",
        "content": [{"type": "reasoning_text", "text": "t"}],
    }
    call_item = {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": "f",
        "arguments": "{}",
        "status": "completed",
    }
    result = sanitize_input(reasoning, call_item)
    assert result == [reasoning, call_item]
    assert result[0] is reasoning
    assert result[1] is call_item


# --- tool_calls -> function_call items ------------------------------------------------------


def test_assistant_tool_calls_become_function_call_items_after_the_message() -> None:
    result = sanitize_input(
        {"role": "user", "content": "time in Tokyo and Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call("call_1"), call("call_2", "get_date")]},
        {"type": "function_call_output", "call_id": "call_1", "output": "10:00"},
        {"type": "function_call_output", "call_id": "call_2", "output": "Monday"},
    )
    assert result == [
        {"role": "user", "content": "time in Tokyo and Paris?"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
        function_call("call_1"),
        function_call("call_2", "get_date"),
        {"type": "function_call_output", "call_id": "call_1", "output": "10:00"},
        {"type": "function_call_output", "call_id": "call_2", "output": "Monday"},
    ]


def test_assistant_without_text_is_dropped_around_tool_calls() -> None:
    for content in (None, "", [], [{"type": "reasoning_content", "text": "r"}]):
        message = {"role": "assistant", "content": content, "tool_calls": [call("call_1")]}
        assert sanitize_input(message) == [function_call("call_1")], content
    assert sanitize_input({"role": "assistant", "tool_calls": [call("call_1")]}) == [function_call("call_1")]


def test_object_arguments_are_serialized_to_compact_json() -> None:
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [call("c", arguments={"city": "Zürich", "n": [1, 2]})],
    }
    assert sanitize_input(message) == [function_call("c", arguments='{"city":"Zürich","n":[1,2]}')]


def test_string_arguments_are_kept_verbatim() -> None:
    message = {"role": "assistant", "content": None, "tool_calls": [call("c", arguments='{ "a" : 1 }')]}
    assert sanitize_input(message) == [function_call("c", arguments='{ "a" : 1 }')]


def test_empty_tool_calls_list_is_just_stripped() -> None:
    assert sanitize_input({"role": "assistant", "content": "a", "tool_calls": []}) == [
        {"role": "assistant", "content": [{"type": "output_text", "text": "a"}]}
    ]


# --- content type normalization -------------------------------------------------------------


def test_assistant_string_content_becomes_output_text() -> None:
    assert sanitize_input({"role": "assistant", "content": "hello"}) == [
        {"role": "assistant", "content": [{"type": "output_text", "text": "hello"}]}
    ]


def test_assistant_text_parts_become_output_text() -> None:
    output_text = {"type": "output_text", "text": "c", "annotations": [], "logprobs": []}
    refusal = {"type": "refusal", "refusal": "no"}
    message = {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "a"}, {"type": "input_text", "text": "b"}, output_text, refusal],
    }
    result = sanitize_input(message)
    assert result == [
        {
            "type": "message",
            "role": "assistant",
            "content": [
                {"type": "output_text", "text": "a"},
                {"type": "output_text", "text": "b"},
                output_text,
                refusal,
            ],
        }
    ]
    assert result[0]["content"][2] is output_text


def test_chat_text_parts_become_input_text_for_other_roles() -> None:
    result = sanitize_input(
        {"role": "user", "content": [{"type": "text", "text": "u"}]},
        {"role": "system", "content": [{"type": "text", "text": "s"}]},
        {"type": "message", "role": "developer", "content": [{"type": "text", "text": "d"}]},
    )
    assert result == [
        {"role": "user", "content": [{"type": "input_text", "text": "u"}]},
        {"role": "system", "content": [{"type": "input_text", "text": "s"}]},
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "d"}]},
    ]


def test_chat_image_url_parts_become_input_image() -> None:
    input_image = {"type": "input_image", "image_url": "https://x/c.png", "detail": "auto"}
    message = {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "high"}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "image_url", "image_url": "https://x/b.png"},
            input_image,
        ],
    }
    assert sanitize_input(message) == [
        {
            "role": "user",
            "content": [
                {"type": "input_image", "image_url": "https://x/a.png", "detail": "high"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                {"type": "input_image", "image_url": "https://x/b.png"},
                input_image,
            ],
        }
    ]


def test_user_string_content_is_kept() -> None:
    message = {"role": "user", "content": "plain"}
    assert sanitize_input(message)[0] is message


def test_non_message_items_with_content_are_untouched() -> None:
    item = {"type": "custom_item", "role": "assistant", "content": "x", "tool_calls": [1]}
    assert sanitize_input(item)[0] is item


# --- validate_request then sanitize_for_upstream --------------------------------------------


def test_chat_messages_request_end_to_end() -> None:
    request = {
        "model": "gpt-4.1",
        "temperature": 0.3,
        "fallbacks": ["gpt-4o"],
        "messages": [
            {"role": "system", "content": "You are a clock."},
            {"role": "user", "content": [{"type": "text", "text": "Time in Tokyo?"}]},
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "I should call the tool.",
                "tool_calls": [call("call_1", arguments={"tz": "Asia/Tokyo"})],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "10:00"}]},
            {"role": "assistant", "content": "It is 10:00."},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [{"type": "function", "name": "get_time", "parameters": {"type": "object"}}],
    }
    assert sanitize_for_upstream(validate_request(request), DEFAULT_STRIP) == {
        "model": "gpt-4.1",
        "store": False,
        "instructions": "You are a clock.",
        "tools": [{"type": "function", "name": "get_time", "parameters": {"type": "object"}}],
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Time in Tokyo?"}]},
            function_call("call_1"),
            {"type": "function_call_output", "call_id": "call_1", "output": "10:00"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "It is 10:00."}]},
            {"role": "user", "content": "Thanks"},
        ],
    }


def test_string_input_request_end_to_end() -> None:
    request = {"model": "gpt-4.1", "input": "hi", "stream": True, "tools": [{"type": "web_search_preview"}]}
    assert sanitize_for_upstream(validate_request(request), DEFAULT_STRIP) == {
        "model": "gpt-4.1",
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        "stream": True,
        "tools": [{"type": "web_search"}],
        "store": False,
    }
