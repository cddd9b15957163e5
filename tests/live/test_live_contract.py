"""The request contract of seed 004 on the wire, through a live gateway (raw HTTP).

tests/test_validation.py covers the rules' logic; here every rule is proven end to end:
HTTP status, the four-key error envelope (``type``, ``code``, ``param``), ``x-request-id``,
that a rejected request never reaches the upstream, and what the upstream received for
the requests that pass.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import MODEL, OTHER_MODEL, Live
from tests.harness import assert_error, poll, sse_events

pytestmark = pytest.mark.live

FUNCTION_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
INVALID = "invalid_request_error"
INVALID_TYPE = "invalid_type"


def body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": "hi", **fields}


# (id, request body, param); every case is a 400 with code invalid_request_error unless listed below.
VALIDATION_CASES: list[tuple[str, dict[str, Any], str | None]] = [
    ("input_and_messages", body(messages=[{"role": "user", "content": "hi"}]), "messages"),
    ("neither_input_nor_messages", {"model": MODEL}, "input"),
    ("input_number", body(input=42), "input"),
    ("input_object", body(input={"role": "user", "content": "hi"}), "input"),
    ("input_bool", body(input=True), "input"),
    ("missing_model", {"input": "hi"}, "model"),
    ("input_file_id_item", body(input=[{"type": "input_file", "file_id": "file-abc"}]), "input[0].file_id"),
    (
        "input_file_id_part",
        body(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "file-abc"}]}]),
        "input[0].content[0].file_id",
    ),
    (
        "messages_input_file_id",
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": "first"},
                {"role": "user", "content": [{"type": "input_file", "file_id": "file-abc"}]},
            ],
        },
        "messages[1].content[0].file_id",
    ),
    *[
        (f"tool_{tool}", body(tools=[FUNCTION_TOOL, {"type": tool}]), "tools[1].type")
        for tool in ("file_search", "code_interpreter", "computer_use", "computer_use_preview", "image_generation")
    ],
    (
        "conversation_and_previous_response_id",
        body(conversation="conv_1", previous_response_id="resp_1"),
        "previous_response_id",
    ),
    ("previous_response_id", body(previous_response_id="resp_1"), "previous_response_id"),
    ("store_true", body(store=True), "store"),
    ("include_unknown", body(include=["output.everything"]), "include[0]"),
    ("include_unknown_after_valid", body(include=["reasoning.encrypted_content", "nope"]), "include[1]"),
    ("include_not_array", body(include="reasoning.encrypted_content"), "include"),
    ("truncation_auto", body(truncation="auto"), "truncation"),
    ("truncation_disabled", body(truncation="disabled"), "truncation"),
    ("tools_not_array", body(tools={"type": "function"}), "tools"),
]

# (id, request body, param): 400 invalid_type, a JSON type mismatch of a top-level field.
TYPE_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("model_number", {"model": 5, "input": "hi"}, "model"),
    ("temperature_string", body(temperature="hot"), "temperature"),
    ("stream_string", body(stream="yes"), "stream"),
    ("max_output_tokens_float", body(max_output_tokens=1.5), "max_output_tokens"),
    ("instructions_list", body(instructions=["be brief"]), "instructions"),
    ("metadata_value_number", body(metadata={"team": 7}), "metadata.team"),
    ("store_string", body(store="false"), "store"),
]


# (id, request body, code): max_output_tokens outside OpenAI's range (issue 10, item 11).
RANGE_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("max_output_tokens_negative", body(max_output_tokens=-5), "integer_below_min_value"),
    ("max_output_tokens_2_63", body(max_output_tokens=2**63), "integer_above_max_value"),
]


def assert_not_forwarded(live_gw: Live, before: int) -> None:
    assert live_gw.upstream.stats()["requests"] == before, "a rejected request must not reach the upstream"


@pytest.mark.parametrize(("case", "payload", "param"), VALIDATION_CASES, ids=[c[0] for c in VALIDATION_CASES])
def test_validation_rule_rejected_on_the_wire(live_gw: Live, case: str, payload: dict[str, Any], param: str) -> None:
    before = live_gw.upstream.stats()["requests"]
    response = live_gw.post(payload)
    assert_error(response, 400, INVALID, param=param)
    assert_not_forwarded(live_gw, before)


@pytest.mark.parametrize(("case", "payload", "param"), TYPE_CASES, ids=[c[0] for c in TYPE_CASES])
def test_wrong_json_type_is_invalid_type(live_gw: Live, case: str, payload: dict[str, Any], param: str) -> None:
    before = live_gw.upstream.stats()["requests"]
    error = assert_error(live_gw.post(payload), 400, INVALID_TYPE, param=param)
    assert param in error["message"]
    assert_not_forwarded(live_gw, before)


@pytest.mark.parametrize(("case", "payload", "code"), RANGE_CASES, ids=[c[0] for c in RANGE_CASES])
def test_max_output_tokens_out_of_range_is_400(live_gw: Live, case: str, payload: dict[str, Any], code: str) -> None:
    before = live_gw.upstream.stats()["requests"]
    error = assert_error(live_gw.post(payload), 400, code, param="max_output_tokens")
    assert error["type"] == INVALID
    assert_not_forwarded(live_gw, before)


def _deep_schema(levels: int) -> bytes:
    """A request whose function tool's parameters nest ``levels`` levels below the body."""
    schema = b'{"type": "object", "properties": {"x": ' * levels + b'{"type": "string"}' + b"}}" * levels
    head = b'{"model": "%s", "input": "hi", "tools": [{"type": "function", "name": "f", "parameters": ' % MODEL.encode()
    return head + schema + b"}]}"


@pytest.mark.parametrize("levels", [40, 150], ids=["84_levels", "304_levels"])
def test_nesting_over_64_levels_is_400_before_admission(live_gw: Live, levels: int) -> None:
    """JSON nested 255-1023 levels used to pass validation, then fail serialization (a 500)."""
    before = live_gw.upstream.stats()["requests"]
    response = live_gw.post(None, content=_deep_schema(levels), headers={"content-type": "application/json"})
    assert_error(response, 400, "nesting_too_deep")
    assert_not_forwarded(live_gw, before)
    record = live_gw.wait_usage(response.headers["x-request-id"])
    assert (record.status_code, record.outcome) == (400, "rejected")


def test_nesting_of_real_tool_schemas_passes(live_gw: Live) -> None:
    response = live_gw.post(None, content=_deep_schema(20), headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


def test_large_bodies_are_parsed_and_validated_off_the_loop_with_the_same_answers(live_gw: Live) -> None:
    """Over 1 MiB, parsing and validation run in a worker thread (gateway/dataplane/offload.py)."""
    items: list[dict[str, Any]] = [{"role": "user", "content": "hi"}] * 40_000  # ~1.2 MiB
    response = live_gw.post(body(input=items))
    assert response.status_code == 200, response.text
    assert len(response.request.content) > 1 << 20
    bad = [*items, {"type": "input_file", "file_id": "file_1"}]
    assert_error(live_gw.post(body(input=bad)), 400, INVALID, param=f"input[{len(items)}].file_id")


def test_streaming_request_rejected_as_plain_json(live_gw: Live) -> None:
    """Errors found before the stream starts are plain JSON errors, even with stream: true."""
    response = live_gw.post(body(stream=True, store=True))
    assert_error(response, 400, INVALID, param="store")


def test_body_not_json(live_gw: Live) -> None:
    response = live_gw.post(
        None, content=b'{"model": "gpt-test", "input": ', headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "invalid_json")


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"hello"', b"42", b"null"])
def test_body_not_an_object(live_gw: Live, payload: bytes) -> None:
    response = live_gw.post(None, content=payload, headers={"content-type": "application/json"})
    assert_error(response, 400, INVALID)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_size_limit_is_413(live_gw: Live, chunked: bool) -> None:
    before = live_gw.upstream.stats()["requests"]
    big = b'{"model": "gpt-test", "input": "' + b"a" * (17 * 1024 * 1024) + b'"}'
    content: Any = big
    if chunked:  # no content-length: the limit must hold while reading
        content = (big[i : i + (1 << 20)] for i in range(0, len(big), 1 << 20))
    response = live_gw.post(None, content=content, headers={"content-type": "application/json"})
    error = assert_error(response, 413, "request_too_large")
    assert str(16 * 1024 * 1024) in error["message"]
    assert_not_forwarded(live_gw, before)
    assert live_gw.post(body()).status_code == 200, "the gateway keeps serving after a 413"


def test_conversation_is_not_implemented(live_gw: Live) -> None:
    before = live_gw.upstream.stats()["requests"]
    assert_error(live_gw.post(body(conversation="conv_123")), 501, "not_implemented", param="conversation")
    assert_error(live_gw.post(body(conversation={"id": "conv_123"})), 501, "not_implemented", param="conversation")
    assert_not_forwarded(live_gw, before)


@pytest.mark.parametrize("path", ["/v1/responses/resp_123", "/v1/conversations", "/v1/conversations/conv_1/items"])
def test_stored_objects_are_not_implemented(live_gw: Live, path: str) -> None:
    with live_gw.http() as client:
        assert_error(client.get(path), 501, "not_implemented")


# --- what passes, and what the upstream receives -------------------------------------------------


@pytest.mark.parametrize(
    "include", [[], ["reasoning.encrypted_content"], ["message.output_text.logprobs", "web_search_call.action.sources"]]
)
def test_include_allowlist_passes(live_gw: Live, include: list[str]) -> None:
    response = live_gw.post(body(include=include))
    assert response.status_code == 200, response.text
    assert live_gw.upstream.last_request()["body"]["include"] == include


@pytest.mark.parametrize("alias", ["web_search_preview", "web_search_preview_2025_03_11"])
def test_web_search_preview_becomes_web_search(live_gw: Live, alias: str) -> None:
    tools = [{"type": alias, "search_context_size": "low"}, FUNCTION_TOOL]
    response = live_gw.post(body(tools=tools, tool_choice={"type": alias}))
    assert response.status_code == 200, response.text
    sent = live_gw.upstream.last_request()["body"]
    assert sent["tools"] == [{"type": "web_search", "search_context_size": "low"}, FUNCTION_TOOL]
    assert sent["tool_choice"] == {"type": "web_search"}


def test_web_search_passes(live_gw: Live) -> None:
    response = live_gw.post(body(tools=[{"type": "web_search"}]))
    assert response.status_code == 200, response.text
    assert live_gw.upstream.last_request()["body"]["tools"] == [{"type": "web_search"}]


def test_unknown_fields_tools_and_items_pass_through_untouched(live_gw: Live) -> None:
    unknown_items = [
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA=="},
        {"type": "custom_tool_call", "id": "ctc_1", "call_id": "call_9", "name": "apply_patch", "input": "diff"},
        {"type": "custom_tool_call_output", "call_id": "call_9", "output": "ok"},
        {"type": "item_reference", "id": "msg_123"},
        {"type": "brand_new_item", "payload": {"nested": [1, 2, {"x": None}]}},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "go on"}]},
    ]
    unknown_tools = [
        {"type": "custom", "name": "apply_patch", "description": "Apply a patch", "format": {"type": "text"}},
        {"type": "local_shell"},
        {"type": "mcp", "server_label": "docs", "server_url": "https://mcp.example/sse", "require_approval": "never"},
    ]
    extra = {"client_owned_field": {"a": [1, "two", None]}, "service_tier": "flex", "x_trace": "abc"}
    response = live_gw.post(body(input=unknown_items, tools=unknown_tools, **extra))
    assert response.status_code == 200, response.text
    sent = live_gw.upstream.last_request()["body"]
    assert sent["input"] == unknown_items
    assert sent["tools"] == unknown_tools
    for name, value in extra.items():
        assert sent[name] == value


def test_codex_shaped_request_passes(live_gw: Live) -> None:
    """What the Codex CLI sends (RESPONSES_WIRE.md §8) streams through unchanged."""
    request = {
        "model": MODEL,
        "instructions": "You are Codex.",
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "fix the bug"}]}],
        "tools": [FUNCTION_TOOL, {"type": "custom", "name": "apply_patch", "format": {"type": "text"}}],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "low", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "codex-session-1",
        "client_metadata": {"originator": "codex_cli_rs"},
    }
    response = live_gw.post(request)
    assert response.status_code == 200, response.text
    events = sse_events(response.content)
    assert events[-1]["type"] == "response.completed"
    assert live_gw.upstream.last_request()["body"] == request


# --- authentication ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "Basic b3duZXI6c2VjcmV0", "Bearer", "Token sk-abc", "Bearer sk-gw-not-a-real-key-000000000000"],
    ids=["missing", "basic", "bearer-no-key", "token-scheme", "unknown-key"],
)
def test_bad_credentials_are_401(live_gw: Live, authorization: str | None) -> None:
    import httpx

    headers = {} if authorization is None else {"authorization": authorization}
    before = live_gw.upstream.stats()["requests"]
    with httpx.Client(base_url=live_gw.url, timeout=10) as client:
        assert_error(client.post("/v1/responses", json=body(), headers=headers), 401, "invalid_api_key")
        assert_error(client.get("/v1/models", headers=headers), 401, "invalid_api_key")
    assert_not_forwarded(live_gw, before)


def test_error_never_echoes_the_key(live_gw: Live) -> None:
    wrong = live_gw.owner.key[:-4] + "0000"
    response = live_gw.post(body(), key=wrong)
    assert_error(response, 401, "invalid_api_key")
    assert wrong not in response.text
    assert wrong[:12] not in response.text


def test_revoked_key_is_refused_on_the_very_next_request(live_gw: Live) -> None:
    from tenancy.services.keys import apikey_revoke

    assert live_gw.post(body()).status_code == 200
    apikey_revoke(api_key=live_gw.owner.api_key)
    assert_error(live_gw.post(body()), 401, "invalid_api_key")
    with live_gw.http() as client:
        assert_error(client.get("/v1/models"), 401, "invalid_api_key")
    assert live_gw.post(body(), key=live_gw.outsider.key).status_code == 200, "other keys are unaffected"


def test_a_rotated_keys_old_secret_works_for_the_grace_period_only(live_gw: Live) -> None:
    from tenancy.services.keys import apikey_rotate

    api_key, old = live_gw.new_key()
    assert live_gw.post(body(), key=old).status_code == 200  # cached by the gateway now
    api_key, new = apikey_rotate(api_key=api_key, grace_seconds=2)
    assert api_key.previous_valid_until is not None
    assert live_gw.post(body(), key=new).status_code == 200, "the new secret works at once"
    assert live_gw.post(body(), key=old).status_code == 200, "the old one during the grace period"

    def refused() -> bool:
        return live_gw.post(body(), key=old).status_code == 401

    poll(refused, timeout=10, interval=0.1, what="the end of the grace period")
    assert time.time() >= api_key.previous_valid_until.timestamp()
    assert live_gw.post(body(), key=new).status_code == 200
    # Rotating without a grace period: the old secret is refused on the very next request.
    api_key, newer = apikey_rotate(api_key=api_key)
    assert_error(live_gw.post(body(), key=new), 401, "invalid_api_key")
    assert live_gw.post(body(), key=newer).status_code == 200


def test_expired_key_is_401(live_gw: Live) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    _, secret = live_gw.new_key(expires_at=expires)
    assert live_gw.post(body(), key=secret).status_code == 200, "valid until it expires"

    def refused() -> bool:
        with live_gw.http(secret) as client:
            return client.get("/v1/models").status_code == 401

    poll(refused, timeout=10, interval=0.05, what="expiry of the key")
    assert time.time() >= expires.timestamp()
    error = assert_error(live_gw.post(body(), key=secret), 401, "invalid_api_key")
    assert "expired" in error["message"]


# --- model access -----------------------------------------------------------------------------------


def test_model_outside_allowed_models_is_403(live_gw: Live) -> None:
    _, secret = live_gw.new_key(allowed_models=[OTHER_MODEL])
    before = live_gw.upstream.stats()["requests"]
    assert_error(
        live_gw.post(body(model=MODEL), key=secret),
        403,
        "model_not_allowed",
        message=f"This API key does not have access to model '{MODEL}'",
    )
    assert_not_forwarded(live_gw, before)
    assert live_gw.post(body(model=OTHER_MODEL), key=secret).status_code == 200


def test_model_nobody_serves_is_404(live_gw: Live) -> None:
    assert_error(live_gw.post(body(model="gpt-nobody")), 404, "model_not_found")


def test_model_served_only_by_a_disabled_account_is_503(live_gw: Live) -> None:
    from accounts import services as account_services

    account = live_gw.add_account(["gpt-solo"])
    assert live_gw.post(body(model="gpt-solo")).status_code == 200
    account_services.upstream_account_set_enabled(account=account, enabled=False)
    assert_error(live_gw.post(body(model="gpt-solo")), 503, "no_accounts", type="server_error")
    account_services.upstream_account_set_enabled(account=account, enabled=True)
    assert live_gw.post(body(model="gpt-solo")).status_code == 200


def models_of(live_gw: Live, key: str) -> list[str]:
    with live_gw.http(key) as client:
        response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"].startswith("req_")
    listing = response.json()
    assert listing["object"] == "list"
    for entry in listing["data"]:
        assert entry["object"] == "model"
        assert isinstance(entry["created"], int)
        assert entry["owned_by"]
    return [entry["id"] for entry in listing["data"]]


def test_models_lists_allowed_and_served(live_gw: Live) -> None:
    from accounts import services as account_services

    disabled = live_gw.add_account(["gpt-dormant"])
    account_services.upstream_account_set_enabled(account=disabled, enabled=False)
    _, restricted = live_gw.new_key(allowed_models=[OTHER_MODEL, "gpt-dormant", "gpt-unserved"])
    assert sorted(models_of(live_gw, live_gw.owner.key)) == sorted([MODEL, OTHER_MODEL])
    assert models_of(live_gw, restricted) == [OTHER_MODEL]
    with live_gw.http(restricted) as client:
        assert client.get(f"/v1/models/{OTHER_MODEL}").json()["id"] == OTHER_MODEL
        assert_error(client.get(f"/v1/models/{MODEL}"), 404, "model_not_found")


def test_outsider_cannot_use_owner_models(live_gw: Live) -> None:
    live_gw.add_account(["gpt-owner-only"], pool="owner-pool")
    _, outsider_key = live_gw.new_key(live_gw.outsider, allowed_models=[OTHER_MODEL])
    _, owner_key = live_gw.new_key(live_gw.owner, allowed_models=[MODEL, "gpt-owner-only"])
    assert sorted(models_of(live_gw, owner_key)) == sorted([MODEL, "gpt-owner-only"])
    assert models_of(live_gw, outsider_key) == [OTHER_MODEL]
    for model in (MODEL, "gpt-owner-only"):
        assert live_gw.post(body(model=model), key=owner_key).status_code == 200
        assert_error(live_gw.post(body(model=model), key=outsider_key), 403, "model_not_allowed")
    assert live_gw.post(body(model=OTHER_MODEL), key=outsider_key).status_code == 200


# --- x-request-id on everything ---------------------------------------------------------------------


def test_every_response_carries_a_unique_request_id(live_gw: Live) -> None:
    seen: list[str] = []
    with live_gw.http() as client:
        responses = [
            client.post("/v1/responses", json=body()),
            client.post("/v1/responses", json=body(store=True)),
            client.get("/v1/models"),
            client.get("/v1/models/gpt-nope"),
            client.get("/v1/responses"),  # 405
            client.get("/v1/nothing-here"),  # 404
            client.post("/v1/responses", json=body(model="gpt-nobody")),
            client.post("/v1/responses", json=body(metadata={"fake_status": "500"})),
        ]
        with client.stream("POST", "/v1/responses", json=body(stream=True)) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            stream.read()
            responses.append(stream)
        with client.stream("POST", "/v1/responses", json=body(stream=True, metadata={"fake_cut_after": "3"})) as cut:
            cut.read()
            responses.append(cut)
        # Last: a 429 cools the only account down.
        responses.append(client.post("/v1/responses", json=body(metadata={"fake_status": "429"})))
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 400, 200, 404, 405, 404, 404, 502, 200, 200, 429]
    for response in responses:
        request_id = response.headers.get("x-request-id", "")
        assert request_id.startswith("req_"), (response.status_code, response.headers)
        seen.append(request_id)
    assert len(set(seen)) == len(seen)
    assert_error(responses[4], 405, "method_not_allowed")
    assert_error(responses[5], 404, "not_found")
