"""``POST /v1/responses/compact`` and ``POST /v1/responses/input_tokens`` through the real ``openai``
SDK against a live gateway: relayed to the chosen account, validated, failed over, and metered
(a compaction) or counted against the request rate only (input tokens)."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import MODEL, Live

pytestmark = pytest.mark.live

HISTORY = [
    {"role": "user", "content": "Fix the failing test."},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Done."}]},
    {"type": "compaction", "id": "cmp_old", "encrypted_content": "b2xkZXIgc3RhdGU="},
]


def test_compact_is_relayed_and_metered(live_gw: Live) -> None:
    client = live_gw.openai()
    compacted = client.responses.compact(model=MODEL, input=HISTORY, instructions="Keep the task.")
    assert compacted.object == "response.compaction"
    assert compacted.output[-1].type == "compaction"
    assert compacted.output[-1].encrypted_content
    sent = live_gw.upstream.last_request()
    assert sent["path"] == "/v1/responses/compact"
    assert sent["headers"]["authorization"] == "Bearer sk-upstream-secret"  # the account's key, not the client's
    assert sent["body"]["input"][-1] == HISTORY[-1]  # a compaction item goes up untouched
    record = live_gw.wait_usage(compacted._request_id)
    assert record.response_id == compacted.id
    assert record.api_key_id == live_gw.owner.api_key.id
    assert record.account_id == live_gw.account.id
    assert record.input_tokens == compacted.usage.input_tokens
    assert record.total_tokens == compacted.usage.total_tokens
    assert record.stream is False


def test_input_tokens_are_counted_upstream_and_not_billed(live_gw: Live) -> None:
    from tenancy.models import UsageRecord

    before = UsageRecord.objects.count()
    counted = live_gw.openai().responses.input_tokens.count(model=MODEL, input=HISTORY)
    assert counted.input_tokens > 0
    assert live_gw.upstream.last_request()["path"] == "/v1/responses/input_tokens"
    live_gw.drain_usage()
    # Only the drain's sentinel was recorded: counting generates nothing and is not billed.
    assert UsageRecord.objects.count() == before + 1


def test_input_tokens_count_against_the_request_rate(live_gw: Live) -> None:
    _, key = live_gw.new_key(rpm=2)
    client = live_gw.openai(key=key, max_retries=0)
    client.responses.input_tokens.count(model=MODEL, input="one")
    client.responses.input_tokens.count(model=MODEL, input="two")
    with pytest.raises(openai.RateLimitError) as refused:
        client.responses.input_tokens.count(model=MODEL, input="three")
    assert refused.value.body["param"] == "key.rpm"  # type: ignore[index]


@pytest.mark.parametrize("path", ["/v1/responses/compact", "/v1/responses/input_tokens"])
def test_the_contract_applies(live_gw: Live, path: str) -> None:
    with live_gw.http() as client:
        no_model = client.post(path, json={"input": "x"})
        assert (no_model.status_code, no_model.json()["error"]["param"]) == (400, "model")
        streamed = client.post(path, json={"model": MODEL, "input": "x", "stream": True})
        assert (streamed.status_code, streamed.json()["error"]["param"]) == (400, "stream")
        stored = client.post(path, json={"model": MODEL, "input": "x", "previous_response_id": "resp_1"})
        assert (stored.status_code, stored.json()["error"]["param"]) == (400, "previous_response_id")
        unknown_model = client.post(path, json={"model": "no-such-model", "input": "x"})
        assert unknown_model.status_code == 404
        assert client.get(path).status_code == 405
    not_allowed = live_gw.http(key=live_gw.new_key(allowed_models=["gpt-other"])[1]).post(
        path, json={"model": MODEL, "input": "x"}
    )
    assert not_allowed.status_code == 403
    assert live_gw.http(key="sk-gw-wrong").post(path, json={"model": MODEL, "input": "x"}).status_code == 401


def test_compact_fails_over_to_another_account(live_gw: Live) -> None:
    from accounts import services as account_services

    # fill_first tries the lowest priority first: an account nobody listens on.
    account_services.pool_set_strategy(pool=live_gw.account.pool, strategy="fill_first")
    account_services.upstream_account_update(account=live_gw.account, priority=10)
    dead = live_gw.add_account([MODEL], base_url="http://127.0.0.1:9/v1", priority=0)
    compacted = live_gw.openai(max_retries=0).responses.compact(model=MODEL, input=HISTORY)
    assert compacted.object == "response.compaction"
    record = live_gw.wait_usage(compacted._request_id)
    assert record.account_id == live_gw.account.id
    assert [(attempt["account_id"], attempt["outcome"]) for attempt in record.attempts] == [(dead.id, "upstream_error")]
