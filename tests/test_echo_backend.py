"""The echo backend on its own: what it answers, how it streams, counts, stops and fails."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import pytest

from venna.backends.base import (
    BackendError,
    BackendEvent,
    ErrorKind,
    FunctionCallArgumentsDelta,
    FunctionCallStart,
    GenerationRequest,
    Incomplete,
    TextDelta,
    UsageReport,
)
from venna.backends.echo import MODEL_NAMES, EchoBackend
from venna.responses.v1 import response_pb2, service_pb2
from venna.server.generation import generation_request

REQUIRED = response_pb2.ToolChoice(mode=response_pb2.TOOL_CHOICE_MODE_REQUIRED)


def message(role: response_pb2.Role.ValueType, *texts: str) -> response_pb2.Item:
    item = response_pb2.Item()
    item.message.role = role
    for text in texts:
        part = item.message.content.add()
        if role == response_pb2.ROLE_ASSISTANT:
            part.output_text.text = text
        else:
            part.input_text.text = text
    return item


def user(*texts: str) -> response_pb2.Item:
    return message(response_pb2.ROLE_USER, *texts)


def assistant(*texts: str) -> response_pb2.Item:
    return message(response_pb2.ROLE_ASSISTANT, *texts)


def function_tool(name: str) -> response_pb2.Tool:
    tool = response_pb2.Tool()
    tool.function.name = name
    return tool


def generation(
    context: Sequence[response_pb2.Item],
    *,
    model: str = "echo",
    instructions: str | None = None,
    **fields: Any,
) -> GenerationRequest:
    request = service_pb2.CreateResponseRequest(model=model, input=context, **fields)
    if instructions is not None:
        request.instructions = instructions
    return generation_request(request, model=model, context=context)


async def run(request: GenerationRequest) -> list[BackendEvent]:
    backend = EchoBackend()
    backend.validate(request)
    return [event async for event in backend.generate(request)]


async def drain(request: GenerationRequest, received: list[BackendEvent]) -> None:
    """Collects events into ``received``, so that they survive an exception or a cancellation."""
    async for event in EchoBackend().generate(request):
        received.append(event)


def text_deltas(events: Sequence[BackendEvent]) -> list[str]:
    return [event.text for event in events if isinstance(event, TextDelta)]


def usage(events: Sequence[BackendEvent]) -> UsageReport:
    [report] = [event for event in events if isinstance(event, UsageReport)]
    return report


def test_serves_echo_and_venna_1() -> None:
    assert MODEL_NAMES == ("echo", "venna-1")


async def test_streams_the_answer_word_by_word() -> None:
    events = await run(generation([user("hello  gRPC\n world")]))

    assert text_deltas(events) == ["hello", " gRPC", " world"]
    assert "".join(text_deltas(events)) == "hello gRPC world"
    assert events[-1] == UsageReport(input_tokens=3, output_tokens=3)


async def test_venna_1_with_options_answers_alike() -> None:
    events = await run(generation([user("same answer")], model="venna-1:delay_ms=0:fail_after=9"))
    assert "".join(text_deltas(events)) == "same answer"


async def test_answers_the_last_user_message_of_a_conversation() -> None:
    context = [
        message(response_pb2.ROLE_DEVELOPER, "be brief"),
        user("first question"),
        assistant("first answer"),
        user("second ", "question"),
        assistant("an answer that came later"),
    ]
    events = await run(generation(context))

    assert "".join(text_deltas(events)) == "second question"


async def test_answers_a_function_result_sent_back() -> None:
    call = response_pb2.Item()
    call.function_call.call_id = "call_1"
    call.function_call.name = "get_weather"
    call.function_call.arguments = '{"input": "Paris"}'
    result = response_pb2.Item()
    result.function_call_output.call_id = "call_1"
    result.function_call_output.output = "sunny and 21 degrees"
    events = await run(generation([user("Paris"), call, result]))

    assert "".join(text_deltas(events)) == "sunny and 21 degrees"
    # user (1) + call name (1) + arguments (2) + output (4)
    assert usage(events).input_tokens == 1 + 1 + 2 + 4


async def test_without_a_user_message_answers_one_empty_delta() -> None:
    events = await run(generation([message(response_pb2.ROLE_SYSTEM, "system words only")]))
    assert events == [TextDelta(""), UsageReport(input_tokens=3, output_tokens=0)]


async def test_input_tokens_count_the_whole_context_and_the_instructions() -> None:
    refusal = response_pb2.Item()
    refusal.message.role = response_pb2.ROLE_ASSISTANT
    refusal.message.content.add().refusal.refusal = "I cannot"
    reasoning = response_pb2.Item()
    reasoning.reasoning.summary.add().text = "think it over"
    context = [user("one two three"), assistant("four five"), refusal, reasoning, user("six")]
    events = await run(generation(context, instructions="answer tersely please"))

    assert usage(events) == UsageReport(input_tokens=3 + 2 + 2 + 3 + 1 + 3, output_tokens=1)


async def test_max_output_tokens_cuts_the_answer_and_ends_incomplete() -> None:
    words = [f"w{n}" for n in range(40)]
    events = await run(generation([user(" ".join(words))], max_output_tokens=16))

    assert "".join(text_deltas(events)) == " ".join(words[:16])
    assert events[-2:] == [UsageReport(input_tokens=40, output_tokens=16), Incomplete()]
    assert events[-1] == Incomplete(response_pb2.INCOMPLETE_REASON_MAX_OUTPUT_TOKENS)


async def test_an_answer_within_max_output_tokens_completes() -> None:
    events = await run(generation([user("short answer")], max_output_tokens=16))
    assert not any(isinstance(event, Incomplete) for event in events)


def arguments(events: Sequence[BackendEvent]) -> Any:
    deltas = [event.text for event in events if isinstance(event, FunctionCallArgumentsDelta)]
    assert len(deltas) > 1, "arguments should stream in several deltas"
    return json.loads("".join(deltas))


async def test_required_tool_choice_calls_the_first_function() -> None:
    web_search = response_pb2.Tool(web_search=response_pb2.WebSearchTool())
    tools = [web_search, function_tool("get_weather"), function_tool("get_time")]
    events = await run(generation([user("Paris today please")], tools=tools, tool_choice=REQUIRED))

    start = events[0]
    assert isinstance(start, FunctionCallStart)
    assert start.name == "get_weather"
    assert start.call_id.startswith("call_")
    assert len(start.call_id) == len("call_") + 24
    assert arguments(events) == {"input": "Paris today please"}
    assert not text_deltas(events)
    assert events[-1] == UsageReport(input_tokens=3, output_tokens=3)


async def test_named_tool_choice_calls_that_function() -> None:
    choice = response_pb2.ToolChoice(function=response_pb2.ToolChoiceFunction(name="get_time"))
    tools = [function_tool("get_weather"), function_tool("get_time")]
    events = await run(generation([user('say "hi"')], tools=tools, tool_choice=choice))

    assert isinstance(events[0], FunctionCallStart)
    assert events[0].name == "get_time"
    assert arguments(events) == {"input": 'say "hi"'}


async def test_call_ids_differ_between_calls() -> None:
    request = generation([user("x")], tools=[function_tool("f")], tool_choice=REQUIRED)
    first, second = (await run(request))[0], (await run(request))[0]
    assert isinstance(first, FunctionCallStart)
    assert isinstance(second, FunctionCallStart)
    assert first.call_id != second.call_id


async def test_auto_tool_choice_answers_with_text() -> None:
    auto = response_pb2.ToolChoice(mode=response_pb2.TOOL_CHOICE_MODE_AUTO)
    events = await run(generation([user("just text")], tools=[function_tool("f")], tool_choice=auto))
    assert "".join(text_deltas(events)) == "just text"


@pytest.mark.parametrize(
    "model",
    [
        "echo:",
        "echo:delay_ms",
        "echo:=5",
        "echo:speed=2",
        "echo:delay_ms=banana",
        "echo:delay_ms=-1",
        "echo:delay_ms=+5",
        "echo:delay_ms=60001",
        "echo:fail_after=",
        "echo:fail_after=1.5",
        "echo:fail_after=" + "9" * 5000,
        "echo:delay_ms=1:delay_ms=2",
    ],
)
def test_validate_rejects_bad_model_options(model: str) -> None:
    with pytest.raises(BackendError) as caught:
        EchoBackend().validate(generation([user("x")], model=model))
    assert caught.value.kind == ErrorKind.INVALID_REQUEST
    assert caught.value.param == "model"
    assert caught.value.code == "invalid_value"
    assert model.partition(":")[2].partition("=")[0] in caught.value.message


@pytest.mark.parametrize("model", ["echo", "venna-1", "echo:delay_ms=60000", "echo:fail_after=0:delay_ms=0"])
def test_validate_accepts_good_models(model: str) -> None:
    EchoBackend().validate(generation([user("x")], model=model))


async def test_tool_choice_naming_a_missing_function_is_invalid() -> None:
    choice = response_pb2.ToolChoice(function=response_pb2.ToolChoiceFunction(name="missing"))
    request = generation([user("x")], tools=[function_tool("get_weather")], tool_choice=choice)
    with pytest.raises(BackendError) as caught:
        EchoBackend().validate(request)
    assert caught.value.kind == ErrorKind.INVALID_REQUEST
    assert caught.value.param == "tool_choice"
    assert "missing" in caught.value.message
    # generate() refuses it too, before producing anything.
    with pytest.raises(BackendError):
        await anext(EchoBackend().generate(request))


async def test_delay_ms_waits_between_deltas() -> None:
    started = time.monotonic()
    events = await run(generation([user("one two three")], model="echo:delay_ms=30"))
    assert time.monotonic() - started >= 0.06
    assert text_deltas(events) == ["one", " two", " three"]


async def test_delay_ms_applies_to_function_call_arguments() -> None:
    request = generation(
        [user("a b c")], model="echo:delay_ms=20", tools=[function_tool("f")], tool_choice=REQUIRED
    )
    started = time.monotonic()
    events = await run(request)
    chunks = sum(isinstance(event, FunctionCallArgumentsDelta) for event in events)
    assert time.monotonic() - started >= 0.02 * (chunks - 1)


async def test_cancelling_during_a_delay_stops_promptly() -> None:
    received: list[BackendEvent] = []
    task = asyncio.create_task(
        drain(generation([user("one two three")], model="echo:delay_ms=10000"), received)
    )
    await asyncio.sleep(0.05)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 0.5
    assert received == [TextDelta("one")]


async def test_fail_after_fails_once_that_many_words_are_written() -> None:
    received: list[BackendEvent] = []
    with pytest.raises(BackendError) as caught:
        await drain(generation([user("a b c d e f")], model="echo:fail_after=3"), received)

    assert received == [TextDelta("a"), TextDelta(" b"), TextDelta(" c")]
    assert caught.value.kind == ErrorKind.INTERNAL
    assert caught.value.code == "server_error"
    assert caught.value.message == "echo model failed on request"


async def test_fail_after_zero_fails_before_any_output() -> None:
    stream = EchoBackend().generate(generation([user("a b")], model="echo:fail_after=0"))
    with pytest.raises(BackendError):
        await anext(stream)


async def test_fail_after_beyond_the_answer_completes() -> None:
    events = await run(generation([user("a b")], model="echo:fail_after=3"))
    assert "".join(text_deltas(events)) == "a b"
