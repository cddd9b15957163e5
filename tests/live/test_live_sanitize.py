"""Seed 004 "Input Sanitization", proven by what the fake upstream actually received."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import MODEL, Live

pytestmark = pytest.mark.live

DEFAULT_STRIPPED = ("safety_identifier", "prompt_cache_retention", "temperature", "max_output_tokens")


def forwarded(live_gw: Live, payload: dict[str, Any]) -> dict[str, Any]:
    """Send ``payload`` through the gateway and return the body the upstream received."""
    response = live_gw.post(payload)
    assert response.status_code == 200, response.text
    received = live_gw.upstream.last_request()
    assert received["path"] == "/v1/responses"
    body: dict[str, Any] = received["body"]
    return body


def test_default_strip_fields_never_reach_the_upstream(live_gw: Live) -> None:
    sent = forwarded(
        live_gw,
        {
            "model": MODEL,
            "input": "hi",
            "safety_identifier": "user-42",
            "prompt_cache_retention": "24h",
            "temperature": 0.2,
            "max_output_tokens": 500,
            "reasoning": {"effort": "low", "summary": "auto"},
            "prompt_cache_key": "k1",
            "top_p": 0.9,
        },
    )
    for name in DEFAULT_STRIPPED:
        assert name not in sent, name
    # Top-level reasoning controls and everything else are kept.
    assert sent["reasoning"] == {"effort": "low", "summary": "auto"}
    assert sent["prompt_cache_key"] == "k1"
    assert sent["top_p"] == 0.9


def test_narrowed_pool_forwards_the_fields_it_no_longer_strips(live_gw: Live) -> None:
    from accounts import services as account_services

    payload = {
        "model": MODEL,
        "input": "hi",
        "safety_identifier": "user-42",
        "temperature": 0.2,
        "max_output_tokens": 500,
        "prompt_cache_retention": "24h",
    }
    assert not set(DEFAULT_STRIPPED) & set(forwarded(live_gw, payload))
    account_services.pool_set_strip_fields(pool=live_gw.account.pool, fields=["safety_identifier"])
    # The very next request, same gateway process: no restart, no wait.
    sent = forwarded(live_gw, payload)
    assert "safety_identifier" not in sent
    assert sent["temperature"] == 0.2
    assert sent["max_output_tokens"] == 500
    assert sent["prompt_cache_retention"] == "24h"
    account_services.pool_set_strip_fields(pool=live_gw.account.pool, fields=[])
    assert forwarded(live_gw, payload)["safety_identifier"] == "user-42"
    account_services.pool_set_strip_fields(pool=live_gw.account.pool, fields=None)
    assert not set(DEFAULT_STRIPPED) & set(forwarded(live_gw, payload))


def test_interleaved_reasoning_fields_are_removed(live_gw: Live) -> None:
    reasoning_item = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA=="}
    sent = forwarded(
        live_gw,
        {
            "model": MODEL,
            "reasoning": {"effort": "medium"},
            "input": [
                {"role": "user", "content": "Plan a trip", "reasoning_content": "leak?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "reasoning", "text": "thinking..."},
                        {"type": "output_text", "text": "Sure."},
                        {"type": "reasoning_details", "details": []},
                    ],
                    "reasoning_content": "I should...",
                    "reasoning_details": [{"type": "reasoning.text", "text": "..."}],
                    "function_call": {"name": "legacy", "arguments": "{}"},
                },
                reasoning_item,
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Go"}]},
            ],
        },
    )
    assert sent["input"] == [
        {"role": "user", "content": "Plan a trip"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Sure."}]},
        reasoning_item,  # a real Responses item: untouched
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Go"}]},
    ]
    assert sent["reasoning"] == {"effort": "medium"}


def test_assistant_content_becomes_output_text(live_gw: Live) -> None:
    sent = forwarded(
        live_gw,
        {
            "model": MODEL,
            "input": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"type": "message", "role": "assistant", "content": [{"type": "input_text", "text": "Part one."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Part two."}]},
                {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
            ],
        },
    )
    assert sent["input"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello! How can I help?"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Part one."}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Part two."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Thanks"}]},
    ]


def test_tool_messages_become_function_call_output(live_gw: Live) -> None:
    sent = forwarded(
        live_gw,
        {
            "model": MODEL,
            "input": [
                {"role": "user", "content": "Weather?"},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {
                    "role": "tool",
                    "call_id": "call_2",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
        },
    )
    assert sent["input"][2:] == [
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": "ab"},
    ]


def test_chat_tool_calls_become_function_calls_before_their_outputs(live_gw: Live) -> None:
    sent = forwarded(
        live_gw,
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "Use tools."},
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                        },
                        {
                            "id": "call_b",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": {"city": "Rome"}},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_b", "content": "rainy"},
            ],
        },
    )
    assert sent["instructions"] == "Use tools."
    assert sent["input"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "call_b", "name": "get_weather", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_b", "output": "rainy"},
    ]


def test_assistant_text_with_tool_calls_keeps_the_text(live_gw: Live) -> None:
    sent = forwarded(
        live_gw,
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": "Let me check.",
                    "tool_calls": [{"id": "call_a", "function": {"name": "get_weather", "arguments": "{}"}}],
                },
                {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
            ],
        },
    )
    assert sent["input"][1:] == [
        {"role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
    ]


def test_messages_become_instructions_and_input(live_gw: Live) -> None:
    sent = forwarded(
        live_gw,
        {
            "model": MODEL,
            "instructions": "Be kind.",
            "messages": [
                {"role": "system", "content": "You are a math tutor."},
                {
                    "role": "developer",
                    "content": [{"type": "text", "text": "Answer in "}, {"type": "text", "text": "English."}],
                },
                {"role": "user", "content": "What is 15 * 23?"},
                {"role": "assistant", "content": "345"},
                {"role": "user", "content": "And 16 * 23?"},
            ],
        },
    )
    assert "messages" not in sent
    assert sent["instructions"] == "Be kind.\n\nYou are a math tutor.\n\nAnswer in English."
    assert sent["input"] == [
        {"role": "user", "content": "What is 15 * 23?"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "345"}]},
        {"role": "user", "content": "And 16 * 23?"},
    ]


def test_string_input_becomes_one_user_message_and_store_false(live_gw: Live) -> None:
    sent = forwarded(live_gw, {"model": MODEL, "input": "hello"})
    assert sent["input"] == [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}]
    assert sent["store"] is False, "the upstream's default is store: true; the contract's is false"


def test_upstream_sees_the_account_credential_never_the_tenant_key(live_gw: Live) -> None:
    for stream in (False, True):
        response = live_gw.post({"model": MODEL, "input": "hi", "stream": stream})
        assert response.status_code == 200
        received = live_gw.upstream.last_request()
        assert received["headers"]["authorization"] == "Bearer sk-upstream-secret"
        assert live_gw.owner.key not in str(received)
        assert live_gw.owner.key[:12] not in str(received), "not even the key's prefix"
        assert received["headers"]["accept"] == ("text/event-stream" if stream else "application/json")


def test_account_without_credential_sends_no_authorization(live_gw: Live) -> None:
    live_gw.add_account(["gpt-open"], api_key=None)
    forwarded(live_gw, {"model": "gpt-open", "input": "hi"})
    received = live_gw.upstream.last_request()
    assert "authorization" not in received["headers"]
    assert live_gw.owner.key not in str(received)
