"""A chat-completions upstream (dialect "chat") end to end: gRPC client → Venna → a real loopback
HTTP server speaking chat completions as Ollama and vLLM do (``data:`` chunks, ``[DONE]``, usage
in the last chunk, tool calls split across chunks, in-band and HTTP errors, a cut stream).

What goes up is checked in the fake's records (messages rebuilt from the stored context, tools,
response_format, nothing of Venna's own state); what comes down in Venna's canonical stream
and stored response.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from tests.conftest import Venna, error_info, event_type, make_request, output_text, serving
from tests.fake_venice import CHAT_PATH, FakeVenice, Frame, StreamReply, closes_within, error
from tests.test_background import wait_for_status
from tests.test_venice_backend import weather_tool
from venna.backends.echo import EchoBackend
from venna.backends.responses import ResponsesUpstream
from venna.responses.v1 import events_pb2, response_pb2
from venna.server.routing import Router

MODEL = "local/llama3.2"
USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 5,
    "total_tokens": 17,
    "prompt_tokens_details": {"cached_tokens": 4},
    "completion_tokens_details": {"reasoning_tokens": 2},
}
# Keys Venna keeps to itself: the upstream is stateless and must never see them.
VENNA_ONLY_KEYS = {"store", "background", "metadata", "previous_response_id", "instructions", "input"}


def chunk(
    delta: dict[str, Any] | None = None,
    *,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    choices: bool = True,
    delay: float = 0.0,
) -> Frame:
    """One ``data:`` chunk of a streamed chat completion (no ``event:`` line, as servers send)."""
    data: dict[str, Any] = {
        "id": "chatcmpl-7",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "llama3.2",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else [],
    }
    if usage is not None:
        data["usage"] = usage
    return Frame("", {}, raw=f"data: {json.dumps(data)}\n\n", delay=delay)


def chat_stream(
    *deltas: dict[str, Any], finish: str = "stop", usage: dict[str, Any] | None = USAGE, delay: float = 0.0
) -> StreamReply:
    frames = [chunk({"role": "assistant", "content": ""})]
    frames += [chunk(delta, delay=delay) for delta in deltas]
    frames.append(chunk({}, finish=finish))
    if usage is not None:
        frames.append(chunk(usage=usage, choices=False))
    return StreamReply(frames)


def tool_call(
    index: int, *, arguments: str, call_id: str | None = None, name: str | None = None
) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id is not None:
        call.update(id=call_id, type="function")
        call["function"]["name"] = name
    return {"tool_calls": [call]}


@pytest.fixture
async def gateway(tmp_path: Path, fake: FakeVenice) -> AsyncIterator[Venna]:
    upstream = ResponsesUpstream(fake.base_url, None, prefix="local/", dialect="chat", backoff_base=0.01)
    async with serving(tmp_path / "venna.db", Router({"echo": EchoBackend(), "local": upstream})) as venna:
        yield venna


def types(events: list[events_pb2.ResponseStreamEvent]) -> list[str]:
    return [event_type(event) for event in events]


def final(events: list[events_pb2.ResponseStreamEvent]) -> response_pb2.Response:
    last = events[-1]
    member = last.WhichOneof("event")
    assert member in ("completed", "incomplete", "failed"), member
    response: response_pb2.Response = getattr(last, member).response
    return response


async def test_text_streams_with_usage_and_the_context_goes_up_as_messages(
    gateway: Venna, fake: FakeVenice
) -> None:
    fake.queue(chat_stream({"content": "Hel"}, {"content": "lo"}))
    events = await gateway.alpha.stream(model=MODEL, input="hi", instructions="Be brief.")

    assert types(events)[0] == "response.created" and types(events)[-1] == "response.completed"
    assert [event.output_text_delta.delta for event in events if event.HasField("output_text_delta")] == [
        "Hel",
        "lo",
    ]
    response = final(events)
    assert output_text(response) == "Hello"
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (12, 5, 17)
    assert usage.input_tokens_details.cached_tokens == 4
    assert usage.output_tokens_details.reasoning_tokens == 2
    record = fake.requests[0]
    assert record.path == CHAT_PATH
    assert "authorization" not in record.headers  # no api_key_env: a keyless local server
    body = fake.body()
    assert body["model"] == "llama3.2" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert not VENNA_ONLY_KEYS & set(body)

    # Continuing: the stored conversation goes up again, as messages.
    fake.queue(chat_stream({"content": "Sure."}))
    second = await gateway.alpha.create(model=MODEL, input="more", previous_response_id=response.id)
    assert output_text(second) == "Sure."
    assert fake.body()["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "more"},
    ]


async def test_a_tool_call_split_across_chunks_and_its_output_round_trip(
    gateway: Venna, fake: FakeVenice
) -> None:
    fake.queue(
        chat_stream(
            tool_call(0, arguments="", call_id="call_abc", name="get_weather"),
            tool_call(0, arguments='{"city":'),
            tool_call(0, arguments=' "Paris"}'),
            finish="tool_calls",
        )
    )
    response = await gateway.alpha.create(model=MODEL, input="weather in Paris?", tools=[weather_tool()])

    [item] = response.output
    call = item.function_call
    assert (call.name, call.call_id, json.loads(call.arguments)) == (
        "get_weather",
        "call_abc",
        {"city": "Paris"},
    )
    body = fake.body()
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]

    fake.queue(chat_stream({"content": "18°C in Paris."}))
    output = response_pb2.Item()
    output.function_call_output.call_id = "call_abc"
    output.function_call_output.output = '{"celsius": 18}'
    answer = await gateway.alpha.create(
        model=MODEL, input=[output], previous_response_id=response.id, tools=[weather_tool()]
    )
    assert output_text(answer) == "18°C in Paris."
    assert fake.body()["messages"] == [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"celsius": 18}'},
    ]


async def test_parallel_tool_calls_interleaved_by_index_stay_apart(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(
        chat_stream(
            tool_call(0, arguments='{"city": ', call_id="call_1", name="get_weather"),
            tool_call(1, arguments='{"city": ', call_id="call_2", name="get_weather"),
            tool_call(0, arguments='"Paris"}'),
            tool_call(1, arguments='"Rome"}'),
            finish="tool_calls",
        )
    )
    response = await gateway.alpha.create(model=MODEL, input="both", tools=[weather_tool()])
    calls = [
        (item.function_call.call_id, json.loads(item.function_call.arguments)) for item in response.output
    ]
    assert calls == [("call_1", {"city": "Paris"}), ("call_2", {"city": "Rome"})]


async def test_reasoning_content_becomes_a_reasoning_item_before_the_message(
    gateway: Venna, fake: FakeVenice
) -> None:
    fake.queue(
        chat_stream(
            {"reasoning_content": "The user "}, {"reasoning_content": "greets."}, {"content": "Hello!"}
        )
    )
    events = await gateway.alpha.stream(model=MODEL, input="hi")
    response = final(events)
    kinds = [item.WhichOneof("item") for item in response.output]
    assert kinds == ["reasoning", "message"]
    assert "".join(part.text for part in response.output[0].reasoning.content) == "The user greets."
    assert output_text(response) == "Hello!"
    assert "response.reasoning_text.delta" in types(events)


async def test_structured_output_settings_and_a_length_stop(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(chat_stream({"content": '{"answer": 4'}, finish="length"))
    request = make_request(model=MODEL, input="2+2?", max_output_tokens=16, temperature=0.2, seed=7)
    request.stop.append("\n\n")
    request.text.format.json_schema.name = "answer"
    request.text.format.json_schema.schema.update(
        {"type": "object", "properties": {"answer": {"type": "number"}}}
    )
    request.text.format.json_schema.strict = True
    response = await gateway.alpha.stub.CreateResponse(request, metadata=gateway.alpha.metadata)

    assert response.status == response_pb2.RESPONSE_STATUS_INCOMPLETE
    assert response.incomplete_details.reason == response_pb2.INCOMPLETE_REASON_MAX_OUTPUT_TOKENS
    body = fake.body()
    assert (body["max_tokens"], body["temperature"], body["seed"], body["stop"]) == (16, 0.2, 7, ["\n\n"])
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "schema": {"type": "object", "properties": {"answer": {"type": "number"}}},
            "strict": True,
        },
    }


async def test_a_content_filter_stop_is_incomplete(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(chat_stream({"content": "Well"}, finish="content_filter"))
    response = await gateway.alpha.create(model=MODEL, input="hi")
    assert response.status == response_pb2.RESPONSE_STATUS_INCOMPLETE
    assert response.incomplete_details.reason == response_pb2.INCOMPLETE_REASON_CONTENT_FILTER


async def test_upstream_errors_are_mapped(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(error(400, {"error": {"message": "model 'nope' not found", "type": "invalid_request_error"}}))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.alpha.create(model="local/nope", input="hi")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'nope' not found" in (caught.value.details() or "")

    # Retried before anything was produced.
    fake.queue(error(503, {"error": {"message": "loading model"}}), chat_stream({"content": "ok"}))
    assert output_text(await gateway.alpha.create(model=MODEL, input="hi")) == "ok"

    # An error in the stream, after some text: the response fails in-band.
    fake.queue(
        StreamReply(
            [
                chunk({"content": "partial"}),
                Frame("", {}, raw='data: {"error": {"message": "out of memory", "code": "oom"}}\n\n'),
            ]
        )
    )
    events = await gateway.alpha.stream(model=MODEL, input="hi")
    failed = final(events)
    assert failed.status == response_pb2.RESPONSE_STATUS_FAILED
    assert "out of memory" in failed.error.message


async def test_a_cut_stream_fails_the_response(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(chat_stream({"content": "one"}, {"content": " two"}).cut_after(2))
    events = await gateway.alpha.stream(model=MODEL, input="hi")
    response = final(events)
    assert response.status == response_pb2.RESPONSE_STATUS_FAILED
    assert types(events).count("response.failed") == 1
    assert output_text(response) == "one"


async def test_cancel_closes_the_upstream_request(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(chat_stream(*({"content": f" w{n}"} for n in range(100)), delay=0.05))
    queued = await gateway.alpha.create(model=MODEL, input="count slowly", background=True)
    await fake.wait_for(lambda: bool(fake.requests) and fake.requests[0].frames_sent >= 5)
    cancelled_at = time.monotonic()
    assert (await gateway.alpha.cancel(queued.id)).status == response_pb2.RESPONSE_STATUS_CANCELLED
    record = await closes_within(fake, 0, timeout=2.0)
    assert record.disconnected_at is not None
    assert record.disconnected_at - cancelled_at < 0.1
    await wait_for_status(gateway, queued.id, response_pb2.RESPONSE_STATUS_CANCELLED)


async def test_what_chat_completions_cannot_carry_is_refused_up_front(
    gateway: Venna, fake: FakeVenice
) -> None:
    search = response_pb2.Tool()
    search.web_search.SetInParent()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.alpha.create(model=MODEL, input="news?", tools=[search])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["param"] == "tools[0]"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.alpha.create(model=MODEL, input="hi", top_logprobs=2)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fake.requests == []  # nothing went up


async def test_an_unstreamed_answer_is_translated_too(gateway: Venna, fake: FakeVenice) -> None:
    """A server that ignores ``stream`` and answers one JSON chat completion."""
    whole = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_x",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": USAGE,
    }
    fake.queue(error(200, whole))
    response = await gateway.alpha.create(model=MODEL, input="Oslo?", tools=[weather_tool()])
    assert response.status == response_pb2.RESPONSE_STATUS_COMPLETED
    [item] = response.output
    assert (item.function_call.call_id, item.function_call.arguments) == ("call_x", '{"city": "Oslo"}')
    assert response.usage.input_tokens == 12
