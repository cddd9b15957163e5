"""The official clients, unchanged, against a live gateway: the ``openai`` SDK and ``openai-agents``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from tests.conftest import MODEL, OTHER_MODEL, Live

pytestmark = pytest.mark.live

WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "strict": True,
}


class Forecast(BaseModel):
    city: str
    temperature: float
    conditions: list[str]
    windy: bool


def sdk(live_gw: Live, key: str | None = None) -> openai.OpenAI:
    # No retries: a retried 5xx would hide a gateway bug behind a second attempt.
    return live_gw.openai(key, max_retries=0, timeout=20)


def test_create_text_with_usage(live_gw: Live) -> None:
    client = sdk(live_gw)
    raw = client.responses.with_raw_response.create(
        model=MODEL, input="Say hello", instructions="Be brief.", metadata={"fake_tokens": "5"}
    )
    assert raw.headers["x-request-id"].startswith("req_")
    response = raw.parse()
    assert response.object == "response"
    assert response.status == "completed"
    assert response.id.startswith("resp_")
    assert response.model == MODEL
    assert response.output_text == "The quick brown fox jumps"
    usage = response.usage
    assert usage is not None
    assert usage.output_tokens == 5
    assert usage.input_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0


def test_stream_helper_deltas_and_final_response(live_gw: Live) -> None:
    client = sdk(live_gw)
    deltas: list[str] = []
    types: list[str] = []
    with client.responses.stream(model=MODEL, input="Tell a story", metadata={"fake_tokens": "12"}) as stream:
        for event in stream:
            types.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    assert len(deltas) == 12
    assert "".join(deltas) == final.output_text
    assert final.status == "completed"
    assert final.usage is not None
    assert final.usage.output_tokens == 12


def test_stream_true_iteration(live_gw: Live) -> None:
    client = sdk(live_gw)
    events = list(client.responses.create(model=MODEL, input="Count", stream=True, metadata={"fake_tokens": "4"}))
    types = [event.type for event in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    created, completed = events[0], events[-1]
    assert created.type == "response.created"
    assert completed.type == "response.completed"
    assert completed.response.id == created.response.id
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert completed.response.output_text == "".join(deltas)


def test_parse_with_pydantic_model(live_gw: Live) -> None:
    client = sdk(live_gw)
    parsed = client.responses.parse(model=MODEL, input="Weather in Paris as JSON", text_format=Forecast)
    forecast = parsed.output_parsed
    assert isinstance(forecast, Forecast)
    assert forecast == Forecast.model_validate_json(parsed.output_text)
    # The strict JSON schema the SDK derived from the model went upstream as sent.
    sent = live_gw.upstream.last_request()["body"]
    assert sent["text"]["format"]["type"] == "json_schema"
    assert sent["text"]["format"]["strict"] is True
    assert set(sent["text"]["format"]["schema"]["properties"]) == {"city", "temperature", "conditions", "windy"}


def test_function_call_round_trip(live_gw: Live) -> None:
    client = sdk(live_gw)
    history: list[Any] = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = client.responses.create(model=MODEL, input=history, tools=[WEATHER_TOOL])
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather"
    assert call.call_id.startswith("call_")
    arguments = json.loads(call.arguments)
    assert set(arguments) == {"city", "unit"}

    history += first.output  # replayed verbatim, as clients do
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 degrees"})
    second = client.responses.create(model=MODEL, input=history, tools=[WEATHER_TOOL])
    assert second.status == "completed"
    assert second.output_text == "The tool said: sunny, 21 degrees"

    sent = live_gw.upstream.last_request()["body"]["input"]
    assert [item.get("type") for item in sent[-2:]] == ["function_call", "function_call_output"]
    assert sent[-2]["call_id"] == sent[-1]["call_id"] == call.call_id


def test_streamed_function_call(live_gw: Live) -> None:
    client = sdk(live_gw)
    with client.responses.stream(model=MODEL, input="Weather in Oslo?", tools=[WEATHER_TOOL]) as stream:
        argument_deltas = [event.delta for event in stream if event.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    call = final.output[0]
    assert call.type == "function_call"
    assert "".join(argument_deltas) == call.arguments
    assert json.loads(call.arguments)["unit"] in ("celsius", "fahrenheit")


def test_models_list(live_gw: Live) -> None:
    ids = sorted(model.id for model in sdk(live_gw).models.list())
    assert ids == sorted([MODEL, OTHER_MODEL])
    assert sdk(live_gw).models.retrieve(OTHER_MODEL).id == OTHER_MODEL


def test_sdk_maps_gateway_errors_to_its_exceptions(live_gw: Live) -> None:
    _, restricted = live_gw.new_key(allowed_models=[OTHER_MODEL])
    with pytest.raises(openai.AuthenticationError) as auth:
        sdk(live_gw, "sk-gw-nope-nope-nope").responses.create(model=MODEL, input="hi")
    assert auth.value.code == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError) as denied:
        sdk(live_gw, restricted).responses.create(model=MODEL, input="hi")
    assert denied.value.code == "model_not_allowed"
    assert denied.value.message.endswith(f"This API key does not have access to model '{MODEL}'")
    with pytest.raises(openai.BadRequestError) as bad:
        sdk(live_gw).responses.create(model=MODEL, input="hi", store=True)
    assert bad.value.code == "invalid_request_error"
    assert bad.value.param == "store"
    with pytest.raises(openai.NotFoundError):
        sdk(live_gw).responses.create(model="gpt-nobody", input="hi")
    assert sdk(live_gw).responses.create(model=MODEL, input="hi", store=False).status == "completed"


def test_agents_sdk_runs_a_tool_using_agent(live_gw: Live) -> None:
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    seen: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        seen.append(city)
        return f"rainy in {city}"

    async def run() -> Any:
        client = openai.AsyncOpenAI(base_url=live_gw.url + "/v1", api_key=live_gw.owner.key, max_retries=0)
        try:
            agent = Agent(
                name="Forecaster",
                instructions="Answer with the weather tool.",
                tools=[get_weather],
                model=OpenAIResponsesModel(model=MODEL, openai_client=client),
            )
            return await Runner.run(agent, "What's the weather in Bergen?")
        finally:
            await client.close()

    result = asyncio.run(run())
    assert seen == ["x"], "the fake upstream fills string arguments with 'x'"
    assert result.final_output == "The tool said: rainy in x"
    bodies = [entry["body"] for entry in live_gw.upstream.requests()[-2:]]
    assert bodies[0]["tools"][0]["name"] == "get_weather"
    assert bodies[1]["input"][-1]["type"] == "function_call_output"
    assert bodies[1]["input"][-1]["output"] == "rainy in x"
