"""The stateful policy (issue 17) through the real ``openai`` and ``openai-agents`` SDKs over real
sockets: stored responses on ``previous_response_id`` served by a pool of three accounts with the
whole context each turn, the Conversations API, an agents-SDK conversation session, background and
cancel, an outsider's 404 on every stored-object endpoint, and the default policy refusing each.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MODEL, Live
from tests.harness import assert_error, poll

pytestmark = pytest.mark.live


def _stateful(live_gw: Live, *, outsider: bool = False) -> None:
    from tenancy.services.tenants import tenant_update

    tenant_update(tenant=live_gw.owner.tenant, stateful=True)
    if outsider:
        tenant_update(tenant=live_gw.outsider.tenant, stateful=True)


def _upstream_turns(live_gw: Live, since: float) -> list[dict[str, Any]]:
    """The response calls the upstream received since ``since`` (a ``time.time()``): by time, not by
    position, since the fake upstream keeps only its last 50 requests."""
    return [r for r in live_gw.upstream.requests() if r["path"].endswith("/responses") and r["received_at"] >= since]


def _pool_of_three(live_gw: Live) -> None:
    live_gw.add_account([MODEL], api_key="sk-upstream-two")
    live_gw.add_account([MODEL], api_key="sk-upstream-three")


def test_previous_response_id_whole_context_on_a_pool_of_three(live_gw: Live) -> None:
    _stateful(live_gw)
    _pool_of_three(live_gw)
    client = live_gw.openai()
    since = time.time()
    context = 0  # items the upstream must receive before the new input
    first = client.responses.create(model=MODEL, input="turn one", metadata={"fake_expect_items": str(context + 1)})
    assert first.store is True
    assert first.status == "completed"
    context += 1 + len(first.output)
    second = client.responses.create(
        model=MODEL,
        input="turn two",
        previous_response_id=first.id,
        metadata={"fake_expect_items": str(context + 1)},
    )
    assert second.previous_response_id == first.id
    context += 1 + len(second.output)
    # The third turn streams; its events are stored for a replay.
    with client.responses.stream(
        model=MODEL,
        input=[{"role": "user", "content": "turn three"}],
        previous_response_id=second.id,
        metadata={"fake_expect_items": str(context + 1)},
    ) as stream:
        third = stream.get_final_response()
    assert third.previous_response_id == second.id
    # A branch from the first response: its own context only.
    branch = client.responses.create(
        model=MODEL,
        input="another second turn",
        previous_response_id=first.id,
        metadata={"fake_expect_items": str(1 + len(first.output) + 1)},
    )
    assert branch.status == "completed"

    turns = _upstream_turns(live_gw, since)
    assert len(turns) == 4
    for sent in turns:
        assert sent["body"]["store"] is False
        assert "previous_response_id" not in sent["body"]
    texts = [part["text"] for item in turns[2]["body"]["input"] for part in item.get("content") or [] if "text" in part]
    assert "turn one" in texts[0]
    assert first.output_text in texts
    assert "turn two" in texts
    # Each of the first three turns landed on another account of the pool.
    assert len({sent["headers"]["authorization"] for sent in turns[:3]}) == 3

    got = client.responses.retrieve(second.id)
    assert got.id == second.id
    assert got.output_text == second.output_text
    page = client.responses.input_items.list(third.id, limit=1, order="asc")
    assert [item.type for item in page.data] == ["message"]
    assert page.has_more is False
    items = client.responses.input_items.list(first.id)
    assert len(items.data) == 1
    assert items.data[0].id
    replay = client.responses.retrieve(third.id, stream=True)
    events = [event.type for event in replay]
    assert events[0] == "response.created"
    assert events[-1] == "response.completed"
    deleted = client.responses.delete(first.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="x", previous_response_id=first.id)
    assert refused.value.code == "previous_response_not_found"


def test_store_false_is_stateless_and_not_stored(live_gw: Live) -> None:
    _stateful(live_gw)
    client = live_gw.openai()
    response = client.responses.create(model=MODEL, input="hello", store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_conversations_api(live_gw: Live) -> None:
    _stateful(live_gw)
    client = live_gw.openai()
    conversation = client.conversations.create(
        metadata={"topic": "tests"}, items=[{"type": "message", "role": "user", "content": "first"}]
    )
    assert conversation.id.startswith("conv_")
    assert conversation.metadata == {"topic": "tests"}
    added = client.conversations.items.create(
        conversation.id,
        items=[
            {"type": "message", "role": "assistant", "content": "noted"},
            {"type": "message", "role": "user", "content": "third"},
        ],
    )
    assert len(added.data) == 2
    asc = client.conversations.items.list(conversation.id, order="asc", limit=2)
    assert [item.content[0].text for item in asc.data] == ["first", "noted"]
    assert asc.has_more
    rest = client.conversations.items.list(conversation.id, order="asc", limit=2, after=asc.last_id)
    assert [item.content[0].text for item in rest.data] == ["third"]
    assert not rest.has_more
    every = list(client.conversations.items.list(conversation.id, order="desc", limit=1))
    assert [item.content[0].text for item in every] == ["third", "noted", "first"]
    one = client.conversations.items.retrieve(added.data[0].id, conversation_id=conversation.id)
    assert one.id == added.data[0].id

    since = time.time()
    response = client.responses.create(
        model=MODEL, input="fourth", conversation=conversation.id, metadata={"fake_expect_items": "4"}
    )
    assert response.conversation is not None
    assert response.conversation.id == conversation.id
    assert _upstream_turns(live_gw, since)[0]["body"]["store"] is False
    items = list(client.conversations.items.list(conversation.id, order="asc"))
    assert len(items) == 4 + len(response.output)
    assert items[3].content[0].text == "fourth"
    assert items[-1].id == response.output[-1].id

    client.conversations.items.delete(added.data[0].id, conversation_id=conversation.id)
    assert len(list(client.conversations.items.list(conversation.id))) == 3 + len(response.output)
    updated = client.conversations.update(conversation.id, metadata={"topic": "changed"})
    assert updated.metadata == {"topic": "changed"}
    assert client.conversations.retrieve(conversation.id).metadata == {"topic": "changed"}
    client.conversations.delete(conversation.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)


def test_racing_turns_on_one_conversation_do_not_interleave(live_gw: Live) -> None:
    _stateful(live_gw)
    client = live_gw.openai()
    conversation = client.conversations.create()

    async def turns() -> None:
        async_client = openai.AsyncOpenAI(base_url=live_gw.url + "/v1", api_key=live_gw.owner.key)
        await asyncio.gather(
            *(
                async_client.responses.create(model=MODEL, input=f"racer {i}", conversation=conversation.id)
                for i in range(4)
            )
        )
        await async_client.close()

    asyncio.run(turns())
    items = list(client.conversations.items.list(conversation.id, order="asc"))
    assert len(items) == 8
    for index in range(0, 8, 2):  # each turn's input is followed by its own output
        assert items[index].role == "user"
        assert items[index + 1].role == "assistant"


def test_agents_sdk_conversation_session(live_gw: Live) -> None:
    from agents import Agent, OpenAIConversationsSession, OpenAIResponsesModel, Runner, set_tracing_disabled

    _stateful(live_gw)
    set_tracing_disabled(True)
    since = time.time()

    async def run() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=live_gw.url + "/v1", api_key=live_gw.owner.key)
        agent = Agent(name="helper", instructions="Be brief.", model=OpenAIResponsesModel(MODEL, client))
        session = OpenAIConversationsSession(openai_client=client)
        first = await Runner.run(agent, "first question", session=session)
        second = await Runner.run(agent, "second question", session=session)
        assert first.final_output
        assert second.final_output
        items = await session.get_items()
        await client.close()
        return items

    items = asyncio.run(run())
    assert len(items) >= 4
    turns = _upstream_turns(live_gw, since)
    assert len(turns) == 2
    assert len(turns[1]["body"]["input"]) >= 3  # the first exchange came back as context


def test_background_and_cancel(live_gw: Live) -> None:
    _stateful(live_gw)
    client = live_gw.openai()
    queued = client.responses.create(model=MODEL, input="in the background", background=True)
    assert queued.status == "queued"
    assert queued.background is True
    done = poll(lambda: (r := client.responses.retrieve(queued.id)).status == "completed" and r, what="background done")
    assert done.output_text
    assert done.id == queued.id

    slow = client.responses.create(model=MODEL, input="slowly", background=True, metadata={"fake_latency_ms": "5000"})
    assert client.responses.retrieve(slow.id).status in ("queued", "in_progress")
    cancelled = client.responses.cancel(slow.id)
    assert cancelled.status == "cancelled"
    time.sleep(0.3)
    assert client.responses.retrieve(slow.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(client.responses.create(model=MODEL, input="not background").id)


def _endpoints(response_id: str, conversation_id: str, item_id: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [
        ("GET", f"/v1/responses/{response_id}", None),
        ("GET", f"/v1/responses/{response_id}?stream=true", None),
        ("DELETE", f"/v1/responses/{response_id}", None),
        ("GET", f"/v1/responses/{response_id}/input_items", None),
        ("POST", f"/v1/responses/{response_id}/cancel", None),
        ("GET", f"/v1/conversations/{conversation_id}", None),
        ("POST", f"/v1/conversations/{conversation_id}", {"metadata": {"a": "b"}}),
        ("DELETE", f"/v1/conversations/{conversation_id}", None),
        ("GET", f"/v1/conversations/{conversation_id}/items", None),
        ("POST", f"/v1/conversations/{conversation_id}/items", {"items": [{"role": "user", "content": "x"}]}),
        ("GET", f"/v1/conversations/{conversation_id}/items/{item_id}", None),
        ("DELETE", f"/v1/conversations/{conversation_id}/items/{item_id}", None),
    ]


def test_outsider_gets_404_on_every_stored_object(live_gw: Live) -> None:
    _stateful(live_gw, outsider=True)
    client = live_gw.openai()
    response = client.responses.create(model=MODEL, input="private", background=True)
    conversation = client.conversations.create(items=[{"role": "user", "content": "private"}])
    item_id = next(iter(client.conversations.items.list(conversation.id))).id
    with live_gw.http(live_gw.outsider.key) as outsider:
        for method, path, body in _endpoints(response.id, conversation.id, item_id):
            answer = outsider.request(method, path, json=body)
            assert_error(answer, 404, "not_found")
    outsider_sdk = live_gw.openai(live_gw.outsider.key)
    with pytest.raises(openai.BadRequestError) as refused:
        outsider_sdk.responses.create(model=MODEL, input="x", previous_response_id=response.id)
    assert refused.value.code == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        outsider_sdk.responses.create(model=MODEL, input="x", conversation=conversation.id)
    # Still there for their owner.
    poll(lambda: client.responses.retrieve(response.id).status == "completed", what="owner's response")
    assert client.conversations.retrieve(conversation.id).id == conversation.id


def test_default_policy_refuses_each(live_gw: Live) -> None:
    client = live_gw.openai(max_retries=0)
    before = live_gw.upstream.stats()["requests"]
    refusals: list[tuple[Callable[[], Any], type[Exception], str]] = [
        (lambda: client.responses.create(model=MODEL, input="x", store=True), openai.BadRequestError, "store"),
        (
            lambda: client.responses.create(model=MODEL, input="x", previous_response_id="resp_1"),
            openai.BadRequestError,
            "previous_response_id",
        ),
        (lambda: client.responses.create(model=MODEL, input="x", conversation="conv_1"), Exception, "conversation"),
    ]
    for call, kind, param in refusals:
        with pytest.raises(kind) as refused:
            call()
        assert getattr(refused.value, "body", {}).get("param") == param
    with live_gw.http() as http:
        for method, path, body in _endpoints("resp_1", "conv_1", "msg_1"):
            assert_error(http.request(method, path, json=body), 501, "not_implemented")
        assert_error(http.post("/v1/conversations", json={}), 501, "not_implemented")
    assert live_gw.upstream.stats()["requests"] == before


def test_key_policy_overrides_tenant(live_gw: Live) -> None:
    from tenancy.services.keys import apikey_update

    apikey_update(api_key=live_gw.owner.api_key, stateful=True)
    client = live_gw.openai()
    first = client.responses.create(model=MODEL, input="stored by the key's policy")
    assert client.responses.retrieve(first.id).id == first.id
    _stateful(live_gw)
    apikey_update(api_key=live_gw.owner.api_key, stateful=False)
    with httpx.Client(base_url=live_gw.url, headers={"authorization": f"Bearer {live_gw.owner.key}"}) as http:
        assert_error(http.get(f"/v1/responses/{first.id}"), 501, "not_implemented")


def test_bad_input_to_stored_object_endpoints_is_a_4xx_envelope(live_gw: Live) -> None:
    """Malformed bodies, ids and paging parameters on the stateful endpoints: a 4xx with the
    OpenAI error envelope, never a 500."""
    _stateful(live_gw)
    client = live_gw.openai()
    response = client.responses.create(model=MODEL, input="kept")
    conversation = client.conversations.create()
    stored = f"/v1/responses/{response.id}"
    items = f"/v1/conversations/{conversation.id}/items"
    cases: list[tuple[str, str, Any]] = [
        ("POST", "/v1/conversations", {"metadata": ["not", "an", "object"]}),
        ("POST", "/v1/conversations", {"items": "not a list"}),
        ("POST", "/v1/conversations", b"{not json"),
        ("POST", f"/v1/conversations/{conversation.id}", {"metadata": 7}),
        ("POST", items, {"items": "not a list"}),
        ("POST", items, {"items": [7]}),
        ("POST", items, b"\x00\xff"),
        ("GET", f"{items}?limit=abc", None),
        ("GET", f"{items}?limit=0", None),
        ("GET", f"{items}?order=sideways", None),
        ("GET", f"{stored}/input_items?limit=1000", None),
        ("GET", f"{stored}/input_items?after=%00", None),
        ("GET", "/v1/responses/resp_%00", None),
        ("GET", "/v1/responses/" + "x" * 5000, None),
        ("DELETE", "/v1/conversations/conv_missing", None),
        # U+0000 cannot be stored (PostgreSQL's jsonb refuses it): refused before anything is kept.
        ("POST", items, {"items": [{"type": "message", "role": "user", "content": "a\u0000b"}]}),
        ("POST", "/v1/conversations", {"metadata": {"k": "a\u0000b"}}),
        ("POST", "/v1/responses", {"model": MODEL, "input": "a\u0000b"}),
        ("POST", "/v1/responses", {"model": MODEL, "input": "x", "previous_response_id": "resp_\u0000"}),
        ("POST", "/v1/responses", {"model": MODEL, "input": "x", "conversation": "conv_\u0000"}),
        ("POST", f"{stored}/cancel", None),  # not a background response
    ]
    with httpx.Client(base_url=live_gw.url, headers={"authorization": f"Bearer {live_gw.owner.key}"}) as http:
        for method, path, body in cases:
            if isinstance(body, bytes):
                answer = http.request(method, path, content=body, headers={"content-type": "application/json"})
            else:
                answer = http.request(method, path, json=body)
            assert 400 <= answer.status_code < 500, (method, path, body, answer.status_code, answer.text[:300])
            error = answer.json()["error"]
            assert error["message"], (method, path)
            assert set(error) >= {"message", "type", "param", "code"}, (method, path, error)
