"""The Venice backend end to end: gRPC client → Venna → a real HTTP server speaking Venice's dialect.

What goes up is checked in the fake's records (the whole rebuilt context, Venice's tool shapes,
nothing of Venna's own state); what comes down is checked in Venna's canonical stream and stored
response (its own ids and numbering, reasoning, citations, usage, terminal states); failures are
checked as gRPC statuses with their ErrorInfo reasons, and retries as the requests the upstream
actually received.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from tests.conftest import Client, Venna, error_info, event_type, make_request, output_text, serving
from tests.fake_venice import (
    RAYLEIGH_CITATION,
    RAYLEIGH_TEXT,
    RESPONSES_PATH,
    Call,
    FakeVenice,
    Frame,
    Hang,
    Scenario,
    closes_within,
    error,
    function_call_stream,
    raw,
    rayleigh_search,
    reasoning_then_text,
    text_stream,
    venice_stream,
)
from tests.streams import MESSAGE_EVENTS
from venna.backends.echo import EchoBackend
from venna.backends.responses import ResponsesUpstream
from venna.backends.venice import venice_upstream
from venna.responses.v1 import events_pb2, response_pb2, service_pb2
from venna.server.routing import Router

UPSTREAM_KEY = "test-upstream-key"
UPSTREAM_MODEL = "zai-org-glm-5-1"
MODEL = f"venice/{UPSTREAM_MODEL}"
COMPLETED = response_pb2.RESPONSE_STATUS_COMPLETED
FAILED = response_pb2.RESPONSE_STATUS_FAILED
CANCELLED = response_pb2.RESPONSE_STATUS_CANCELLED
# Keys Venna keeps to itself: the upstream is stateless and must never see them.
VENNA_ONLY_KEYS = {"store", "background", "metadata", "previous_response_id", "instructions"}


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


def venice_router(venice: ResponsesUpstream) -> Router:
    """Routes ``venice/…`` to ``venice`` (and ``echo``), as a deployment would."""
    return Router({"echo": EchoBackend(), "venice": venice})


def backend(base_url: str, **options: Any) -> ResponsesUpstream:
    options.setdefault("backoff_base", 0.01)
    return venice_upstream(base_url, UPSTREAM_KEY, **options)


@pytest.fixture
async def gateway(tmp_path: Path, fake: FakeVenice) -> AsyncIterator[Venna]:
    async with serving(tmp_path / "venna.db", venice_router(backend(fake.base_url))) as venna:
        yield venna


def user(text: str) -> dict[str, Any]:
    """A user message as the upstream must receive it."""
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def system(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "system", "content": [{"type": "input_text", "text": text}]}


def assistant(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}


def weather_tool() -> response_pb2.Tool:
    tool = response_pb2.Tool()
    tool.function.name = "get_weather"
    tool.function.description = "Weather of a city"
    tool.function.parameters.update({"type": "object", "properties": {"city": {"type": "string"}}})
    return tool


WEATHER_TOOL_UPSTREAM = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def types(events: list[events_pb2.ResponseStreamEvent]) -> list[str]:
    return [event_type(event) for event in events]


def final_response(events: list[events_pb2.ResponseStreamEvent]) -> response_pb2.Response:
    """The snapshot of the terminal event."""
    last = events[-1]
    member = last.WhichOneof("event")
    assert member in ("completed", "incomplete", "failed"), member
    response: response_pb2.Response = getattr(last, member).response
    return response


def assert_numbered(events: list[events_pb2.ResponseStreamEvent]) -> None:
    """Venna's own numbering, whatever the upstream's was: 0, 1, 2, … without gaps."""
    assert [event.sequence_number for event in events] == list(range(len(events)))


async def wait_for_status(client: Client, response_id: str, status: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (await client.get(response_id)).status != status:
        assert time.monotonic() < deadline, f"{response_id} never reached status {status}"
        await asyncio.sleep(0.01)


def free_port() -> int:
    """A port nothing listens on (closed right after the OS picked it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------------------------------------
# Streams coming down


async def test_text_streams_with_venna_ids_and_zero_usage_details(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(text_stream(["The", " sky", " is blue."], first_sequence_number=40))

    events = await gateway.alpha.stream(model=MODEL, input="Why is the sky blue?")

    assert types(events) == MESSAGE_EVENTS
    assert_numbered(events)
    deltas = [event.output_text_delta.delta for event in events if event.HasField("output_text_delta")]
    assert deltas == ["The", " sky", " is blue."]
    final = final_response(events)
    assert final.status == COMPLETED
    assert final.model == MODEL
    assert final.id.startswith("resp_") and final.id != "resp_chatcmpl-fake0001"
    assert output_text(final) == "The sky is blue."
    [item] = final.output
    assert item.message.id.startswith("msg_") and item.message.id != "msg_venice_1"
    assert item.message.status == response_pb2.ITEM_STATUS_COMPLETED
    # Venice's usage had no *_details: they are reported, as zeros.
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens) == (11, 7, 18)
    assert final.usage.HasField("input_tokens_details") and final.usage.HasField("output_tokens_details")
    assert final.usage.input_tokens_details.cached_tokens == 0
    assert final.usage.output_tokens_details.reasoning_tokens == 0
    assert await gateway.alpha.get(final.id) == final

    [request] = fake.requests
    assert (request.method, request.path) == ("POST", RESPONSES_PATH)
    assert request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert request.body == {"model": UPSTREAM_MODEL, "input": [user("Why is the sky blue?")], "stream": True}


async def test_unary_create_streams_upstream_too(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(text_stream(["one", " answer"]))
    response = await gateway.alpha.create(model=MODEL, input="hi")
    assert response.status == COMPLETED
    assert output_text(response) == "one answer"
    assert fake.body()["stream"] is True  # one code path, whatever the client asked


async def test_reasoning_then_text(gateway: Venna, fake: FakeVenice) -> None:
    usage = {
        "input_tokens": 20,
        "input_tokens_details": {"cached_tokens": 5},
        "output_tokens": 80,
        "output_tokens_details": {"reasoning_tokens": 40},
        "total_tokens": 100,
    }
    encrypted = "gAAAAB-opaque+signature/with=padding=="
    fake.queue(
        reasoning_then_text(
            ["Rayleigh ", "scattering ", "favours blue."],
            ["Because", " of Rayleigh", " scattering."],
            encrypted_content=encrypted,
            usage=usage,
        )
    )

    events = await gateway.alpha.stream(model=MODEL, input="Why is the sky blue?")

    assert_numbered(events)
    summary_deltas = [
        event.reasoning_summary_text_delta.delta
        for event in events
        if event.HasField("reasoning_summary_text_delta")
    ]
    assert summary_deltas == ["Rayleigh ", "scattering ", "favours blue."]
    kinds = types(events)
    # The reasoning item is finished before the message starts.
    assert kinds.index("response.reasoning_summary_text.done") < kinds.index("response.content_part.added")
    final = final_response(events)
    assert final.status == COMPLETED
    reasoning, message = final.output
    assert reasoning.reasoning.id.startswith("rs_") and reasoning.reasoning.id != "rs_venice_1"
    assert [summary.text for summary in reasoning.reasoning.summary] == ["Rayleigh scattering favours blue."]
    # Opaque reasoning state is the caller's only if it asked for it (include), as with OpenAI.
    assert not reasoning.reasoning.HasField("encrypted_content")
    assert all(not event.output_item_done.item.reasoning.encrypted_content for event in events)
    included = await gateway.alpha.stub.GetResponse(
        service_pb2.GetResponseRequest(response_id=final.id, include=["reasoning.encrypted_content"]),
        metadata=gateway.alpha.metadata,
    )
    assert included.output[0].reasoning.encrypted_content == encrypted
    assert message.message.content[0].output_text.text == "Because of Rayleigh scattering."
    assert final.usage.output_tokens_details.reasoning_tokens == 40
    assert final.usage.input_tokens_details.cached_tokens == 5
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens) == (20, 80, 100)

    # The reasoning goes back up on the next turn, summary as plain strings, signature verbatim.
    fake.queue(text_stream(["ok"]))
    await gateway.alpha.create(model=MODEL, input="And at sunset?", previous_response_id=final.id)
    assert fake.body()["input"] == [
        user("Why is the sky blue?"),
        {
            "type": "reasoning",
            "id": reasoning.reasoning.id,
            "summary": ["Rayleigh scattering favours blue."],
            "encrypted_content": encrypted,
        },
        assistant("Because of Rayleigh scattering."),
        user("And at sunset?"),
    ]


async def test_function_call_goes_up_nested_and_comes_back(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(function_call_stream("get_weather", '{"city": "Paris"}', call_id="call_abc123"))
    choice = response_pb2.ToolChoice()
    choice.function.name = "get_weather"

    events = await gateway.alpha.stream(
        model=MODEL, input="Weather in Paris?", tools=[weather_tool()], tool_choice=choice
    )

    body = fake.body()
    assert body["tools"] == [WEATHER_TOOL_UPSTREAM]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert_numbered(events)
    kinds = types(events)
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    streamed = "".join(
        event.function_call_arguments_delta.delta
        for event in events
        if event.HasField("function_call_arguments_delta")
    )
    assert streamed == '{"city": "Paris"}'
    final = final_response(events)
    [item] = final.output
    call = item.function_call
    assert (call.name, call.call_id, call.arguments) == ("get_weather", "call_abc123", '{"city": "Paris"}')
    assert call.id.startswith("fc_") and call.id != "fc_venice_1"
    assert call.status == response_pb2.ITEM_STATUS_COMPLETED

    result = response_pb2.Item()
    result.function_call_output.call_id = "call_abc123"
    result.function_call_output.output = '{"temperature": 21}'
    fake.queue(text_stream(["21 degrees."]))
    follow_up = await gateway.alpha.create(
        model=MODEL, input=[result], tools=[weather_tool()], previous_response_id=final.id
    )
    assert output_text(follow_up) == "21 degrees."
    assert fake.body()["input"] == [
        user("Weather in Paris?"),
        {
            "type": "function_call",
            "call_id": "call_abc123",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_abc123", "output": '{"temperature": 21}'},
    ]


async def test_parallel_function_calls_are_separate_items(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(
        venice_stream(
            calls=[
                Call("get_weather", '{"city": "Paris"}', "call_1"),
                Call("get_weather", '{"city": "Oslo"}', "call_2"),
            ]
        )
    )

    response = await gateway.alpha.create(model=MODEL, input="Paris and Oslo?", tools=[weather_tool()])

    calls = [item.function_call for item in response.output]
    assert [(call.call_id, call.arguments) for call in calls] == [
        ("call_1", '{"city": "Paris"}'),
        ("call_2", '{"city": "Oslo"}'),
    ]
    assert len({call.id for call in calls}) == 2


async def test_tool_choice_modes_and_web_search_tool_in_venice_form(gateway: Venna, fake: FakeVenice) -> None:
    search = response_pb2.Tool()
    search.web_search.SetInParent()
    modes = {
        response_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
        response_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
        response_pb2.TOOL_CHOICE_MODE_NONE: "none",
    }
    for mode, expected in modes.items():
        fake.queue(text_stream(["ok"]))
        await gateway.alpha.create(
            model=MODEL,
            input="x",
            tools=[weather_tool(), search],
            tool_choice=response_pb2.ToolChoice(mode=mode),
        )
        body = fake.body()
        assert body["tools"] == [WEATHER_TOOL_UPSTREAM, {"type": "web_search"}]
        assert body["tool_choice"] == expected


async def test_web_search_with_citations(gateway: Venna, fake: FakeVenice) -> None:
    text, citation = RAYLEIGH_TEXT, RAYLEIGH_CITATION
    fake.queue(rayleigh_search())

    events = await gateway.alpha.stream(model="venice/qwen3:enable_web_search=on", input="Why blue?")

    assert fake.body()["model"] == "qwen3:enable_web_search=on"
    # Venice's response.web_search.done carries no sequence_number: Venna numbers everything.
    assert_numbered(events)
    assert "response.web_search_call.completed" in types(events)
    final = final_response(events)
    assert final.status == COMPLETED
    search, message = final.output
    assert search.web_search_call.id.startswith("ws_") and search.web_search_call.id != "ws_venice_1"
    assert search.web_search_call.status == response_pb2.WEB_SEARCH_CALL_STATUS_COMPLETED
    sources = [source.url for source in search.web_search_call.action.search.sources]
    assert sources == ["https://example.com/rayleigh", "https://example.org/sky"]
    [part] = message.message.content
    assert part.output_text.text == text
    [annotation] = part.output_text.annotations
    cited = annotation.url_citation
    assert (cited.url, cited.title, cited.start_index, cited.end_index) == (
        citation.url,
        citation.title,
        citation.start_index,
        citation.end_index,
    )
    assert await gateway.alpha.get(final.id) == final


async def test_done_comments_and_unknown_events_are_ignored(gateway: Venna, fake: FakeVenice) -> None:
    reply = text_stream(["one", " two", " three"]).with_frames(
        1,
        Frame("response.in_progress", {"type": "response.in_progress", "sequence_number": 1}),
        Frame("response.venice.balance", {"type": "response.venice.balance", "usd": "12.50"}),
        raw(": keep-alive\n\n"),
        Frame("response.future_feature.delta", {"type": "response.future_feature.delta", "delta": "?"}),
    )
    fake.queue(reply)

    events = await gateway.alpha.stream(model=MODEL, input="count")

    assert types(events) == MESSAGE_EVENTS
    assert_numbered(events)
    assert output_text(final_response(events)) == "one two three"


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("max_output_tokens", response_pb2.INCOMPLETE_REASON_MAX_OUTPUT_TOKENS),
        ("content_filter", response_pb2.INCOMPLETE_REASON_CONTENT_FILTER),
    ],
)
async def test_incomplete_keeps_the_reason(
    gateway: Venna, fake: FakeVenice, reason: str, expected: int
) -> None:
    fake.queue(venice_stream(words=["cut", " short"], terminal="incomplete", incomplete_reason=reason))

    events = await gateway.alpha.stream(model=MODEL, input="long story", max_output_tokens=16)

    assert fake.body()["max_output_tokens"] == 16
    assert event_type(events[-1]) == "response.incomplete"
    final = final_response(events)
    assert final.status == response_pb2.RESPONSE_STATUS_INCOMPLETE
    assert final.incomplete_details.reason == expected
    assert output_text(final) == "cut short"
    assert final.output[0].message.status == response_pb2.ITEM_STATUS_INCOMPLETE
    assert final.usage.output_tokens == 7
    assert await gateway.alpha.get(final.id) == final


async def test_upstream_failure_mid_stream_fails_the_response(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(
        venice_stream(words=["partial", " answer"], terminal="failed", failure=("model_overloaded", "Busy."))
    )

    events = await gateway.alpha.stream(model=MODEL, input="hi")

    assert event_type(events[-1]) == "response.failed"
    assert_numbered(events)
    final = final_response(events)
    assert final.status == FAILED
    # Upstream codes outside OpenAI's ResponseErrorCode list are server errors, named in the message.
    assert (final.error.code, final.error.message) == ("server_error", "Busy. (model_overloaded)")
    assert output_text(final) == "partial answer"
    assert (await gateway.alpha.get(final.id)).status == FAILED


async def test_upstream_failure_before_any_output_is_an_error_status(
    gateway: Venna, fake: FakeVenice
) -> None:
    fake.queue(venice_stream(terminal="failed", failure=("inference_failed", "Inference failed.")))

    caught = await rpc_error(gateway.alpha.stream(model=MODEL, input="hi"))

    assert caught.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
    assert "Inference failed." in (caught.details() or "")
    assert len(fake.requests) == 1  # the upstream answered: nothing to retry


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(text_stream(["one", " two", " three"]).cut_after(5), id="connection-dropped"),
        pytest.param(venice_stream(words=["one", " two"], terminal="none", done=True), id="done-too-early"),
        pytest.param(venice_stream(words=["one", " two"], terminal="none", done=False), id="clean-eof"),
    ],
)
async def test_stream_ending_without_a_terminal_event_fails(
    gateway: Venna, fake: FakeVenice, broken: Scenario
) -> None:
    fake.queue(broken)

    events = await gateway.alpha.stream(model=MODEL, input="one two three")

    assert event_type(events[-1]) == "response.failed"
    assert_numbered(events)
    final = final_response(events)
    assert final.status == FAILED
    assert final.error.code == "server_error"
    assert output_text(final).startswith("one two")
    stored = await gateway.alpha.get(final.id)
    assert stored.status == FAILED and stored.error.code == "server_error"
    assert len(fake.requests) == 1  # bytes reached the client: never retried


# ---------------------------------------------------------------------------------------------
# Requests going up


async def test_request_carries_settings_but_nothing_of_venna(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(text_stream(["ok"]))

    await gateway.alpha.create(
        model="venice/qwen3:enable_web_search=on",
        input="hi",
        instructions="Answer in French.",
        metadata={"trace": "t-1"},
        store=True,
        temperature=0.5,
        top_p=0.25,
        max_output_tokens=300,
        prompt_cache_key="conversation-7",
        reasoning=response_pb2.Reasoning(effort=response_pb2.REASONING_EFFORT_LOW),
    )

    body = fake.body()
    assert not VENNA_ONLY_KEYS & set(body)
    assert body["model"] == "qwen3:enable_web_search=on"
    assert body["stream"] is True
    assert body["input"] == [system("Answer in French."), user("hi")]
    assert body["temperature"] == 0.5
    assert body["top_p"] == 0.25
    assert body["max_output_tokens"] == 300
    assert body["prompt_cache_key"] == "conversation-7"
    assert body["reasoning"] == {"effort": "low"}


async def test_unset_settings_are_not_sent(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(text_stream(["ok"]))
    await gateway.alpha.create(model=MODEL, input="hi", background=False, store=False)
    assert set(fake.body()) == {"model", "input", "stream"}


async def test_history_is_expanded_two_deep(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(text_stream(["a1"]), text_stream(["a2"]), text_stream(["a3"]))

    first = await gateway.alpha.create(model=MODEL, input="q1", instructions="Be terse.")
    second = await gateway.alpha.create(model=MODEL, input="q2", previous_response_id=first.id)
    third = await gateway.alpha.create(
        model=MODEL, input="q3", previous_response_id=second.id, instructions="Answer in French."
    )

    assert output_text(third) == "a3"
    bodies = [request.body for request in fake.requests]
    assert [body["input"] for body in bodies] == [
        [system("Be terse."), user("q1")],
        # The first response's instructions are not carried over.
        [user("q1"), assistant("a1"), user("q2")],
        [system("Answer in French."), user("q1"), assistant("a1"), user("q2"), assistant("a2"), user("q3")],
    ]
    for body in bodies:
        assert not VENNA_ONLY_KEYS & set(body)


async def test_other_roles_and_images_go_up_in_responses_form(gateway: Venna, fake: FakeVenice) -> None:
    developer = response_pb2.Item()
    developer.message.role = response_pb2.ROLE_DEVELOPER
    developer.message.content.add().input_text.text = "Use metric units."
    picture = response_pb2.Item()
    picture.message.role = response_pb2.ROLE_USER
    picture.message.content.add().input_text.text = "What is this?"
    picture.message.content.add().input_image.image_url = "data:image/png;base64,iVBORw0KGgo="
    fake.queue(text_stream(["A cat."]))

    await gateway.alpha.create(model=MODEL, input=[developer, picture])

    [first, second] = fake.body()["input"]
    assert first == {
        "type": "message",
        "role": "developer",
        "content": [{"type": "input_text", "text": "Use metric units."}],
    }
    assert second["role"] == "user"
    text_part, image_part = second["content"]
    assert text_part == {"type": "input_text", "text": "What is this?"}
    assert image_part["type"] == "input_image"
    assert image_part["image_url"] == "data:image/png;base64,iVBORw0KGgo="


async def test_unservable_requests_never_reach_the_upstream(
    tmp_path: Path, gateway: Venna, fake: FakeVenice
) -> None:
    structured = response_pb2.TextConfig()
    structured.format.json_schema.name = "answer"
    for fields in ({"model": "venice/"}, {"model": MODEL, "text": structured}):
        caught = await rpc_error(gateway.alpha.create(input="hi", **fields))
        assert caught.code() == INVALID
    # Without an upstream key the gateway is not configured for Venice: a server-side refusal.
    async with serving(tmp_path / "keyless.db", venice_router(venice_upstream(fake.base_url, ""))) as keyless:
        caught = await rpc_error(keyless.alpha.create(model=MODEL, input="hi"))
        assert caught.code() == UNAVAILABLE
    assert fake.requests == []


# ---------------------------------------------------------------------------------------------
# Errors before the stream, and retries


@dataclass(frozen=True)
class ErrorCase:
    """Upstream answers, and the status (and attempts) the client must see."""

    replies: tuple[Scenario, ...]
    code: grpc.StatusCode
    reason: str | None = None
    says: tuple[str, ...] = ()
    attempts: int = 1
    metadata: dict[str, str] = field(default_factory=dict)


DETAILED = {
    "error": "Invalid request parameters",
    "details": {"_errors": [], "temperature": {"_errors": ["Number must be less than or equal to 2"]}},
    "issues": [
        {
            "code": "too_big",
            "maximum": 2,
            "type": "number",
            "inclusive": True,
            "exact": False,
            "message": "Number must be less than or equal to 2",
            "path": ["temperature"],
        }
    ],
}
OPENAI_SHAPED = {
    "error": {
        "message": "This model's maximum context length is 8192 tokens.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED

ERROR_CASES = {
    "400-string": ErrorCase(
        (error(400, {"error": "Model does not support tool calling"}),),
        INVALID,
        says=("Model does not support tool calling",),
    ),
    "400-detailed": ErrorCase(
        (error(400, DETAILED),), INVALID, says=("Invalid request parameters", "less than or equal to 2")
    ),
    "400-detailed-string-details": ErrorCase(
        (error(400, {"error": "Invalid request parameters", "details": "input must not be empty"}),),
        INVALID,
        says=("Invalid request parameters", "input must not be empty"),
    ),
    "400-openai-shaped": ErrorCase(
        (error(400, OPENAI_SHAPED),),
        INVALID,
        reason="CONTEXT_LENGTH_EXCEEDED",
        says=("maximum context length is 8192",),
        # The chat-completions parameter is the Responses API's input.
        metadata={"param": "input"},
    ),
    "404": ErrorCase((error(404, {"error": "Model not found"}),), INVALID, says=("Model not found",)),
    "422": ErrorCase(
        (error(422, {"error": "Content policy violation"}),), INVALID, says=("Content policy violation",)
    ),
    "402": ErrorCase(
        (error(402, {"error": "Insufficient USD or Diem balance to complete request"}),),
        EXHAUSTED,
        reason="INSUFFICIENT_QUOTA",
        says=("Insufficient USD or Diem balance",),
    ),
    "429-retry-after-too-long": ErrorCase(
        (error(429, {"error": "Rate limit exceeded"}, {"Retry-After": "30"}),),
        EXHAUSTED,
        reason="RATE_LIMIT_EXCEEDED",
        metadata={"retry_after": "30"},
    ),
    "429-exhausted": ErrorCase(
        tuple(error(429, {"error": "Model overloaded"}, {"Retry-After": "0"}) for _ in range(3)),
        EXHAUSTED,
        reason="RATE_LIMIT_EXCEEDED",
        attempts=3,
        metadata={"retry_after": "0"},
    ),
    "500": ErrorCase((error(500, {"error": "Inference failed"}),), UNAVAILABLE),
    "502-x3": ErrorCase(tuple(error(502, "Bad Gateway") for _ in range(3)), UNAVAILABLE, attempts=3),
    "503-x3": ErrorCase(
        tuple(error(503, {"error": "Model at capacity"}) for _ in range(3)),
        UNAVAILABLE,
        says=("HTTP 503",),
        attempts=3,
    ),
    "504-x3": ErrorCase(
        tuple(error(504, {"error": "Request timeout"}) for _ in range(3)), DEADLINE, attempts=3
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES.values()), ids=list(ERROR_CASES))
async def test_upstream_errors_map_to_statuses(gateway: Venna, fake: FakeVenice, case: ErrorCase) -> None:
    fake.queue(*case.replies)

    caught = await rpc_error(gateway.alpha.create(model=MODEL, input="hi"))

    assert caught.code() == case.code, caught.details()
    for fragment in case.says:
        assert fragment in (caught.details() or "")
    info = error_info(caught)
    if case.reason is not None:
        assert info.reason == case.reason
    for key, value in case.metadata.items():
        assert info.metadata[key] == value
    assert len(fake.requests) == case.attempts
    assert fake.pending == 0


UPSTREAM_TRACEBACK = (
    'Traceback (most recent call last):\n  File "/srv/app/db.py", line 12, in connect\n'
    "psycopg.OperationalError: connection to postgresql://admin:hunter2@db.internal:5432/venice failed"
)


@pytest.mark.parametrize(
    ("reply", "code", "says"),
    [
        (error(500, UPSTREAM_TRACEBACK), UNAVAILABLE, "The upstream model failed (HTTP 500)."),
        (error(500, {"error": UPSTREAM_TRACEBACK}), UNAVAILABLE, "The upstream model failed (HTTP 500)."),
        (error(400, UPSTREAM_TRACEBACK), INVALID, "The upstream model refused the request (HTTP 400)."),
        (error(429, "<html>" + UPSTREAM_TRACEBACK, {"Retry-After": "30"}), EXHAUSTED, "(HTTP 429)"),
    ],
    ids=["500-text", "500-json", "400-text", "429-html"],
)
async def test_upstream_error_bodies_are_summarized_never_passed_through(
    gateway: Venna, fake: FakeVenice, reply: Any, code: grpc.StatusCode, says: str
) -> None:
    fake.queue(reply)

    caught = await rpc_error(gateway.alpha.create(model=MODEL, input="hi"))

    assert caught.code() == code
    message = caught.details() or ""
    assert says in message
    for secret in ("hunter2", "postgresql://", "Traceback", "db.internal"):
        assert secret not in message


async def test_a_long_upstream_message_about_the_request_is_clipped(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(error(400, {"error": {"message": "Input rejected: " + "x" * 5000, "code": "invalid_value"}}))

    caught = await rpc_error(gateway.alpha.create(model=MODEL, input="hi"))

    assert caught.code() == INVALID
    message = caught.details() or ""
    assert message.startswith("Input rejected: xxx")
    assert len(message) <= 300


@pytest.mark.parametrize("status", [401, 403])
async def test_rejected_upstream_key_is_a_server_error(gateway: Venna, fake: FakeVenice, status: int) -> None:
    fake.queue(error(status, {"error": "Authentication failed"}))

    caught = await rpc_error(gateway.alpha.create(model=MODEL, input="hi"))

    # Our key is bad, not the caller's: never UNAUTHENTICATED, and never retried.
    assert caught.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
    assert UPSTREAM_KEY not in (caught.details() or "")
    assert len(fake.requests) == 1


async def test_stream_call_gets_the_error_status_and_no_events(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(error(400, {"error": "Unsupported feature"}))
    call = gateway.alpha.stub.StreamResponse(
        make_request(model=MODEL, input="hi"), metadata=gateway.alpha.metadata
    )
    events: list[events_pb2.ResponseStreamEvent] = []

    async def read() -> None:
        async for event in call:
            events.append(event)

    caught = await rpc_error(read())
    assert events == []
    assert caught.code() == INVALID
    assert "Unsupported feature" in (caught.details() or "")


async def test_429_then_success_is_retried_after_retry_after(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(error(429, {"error": "Rate limit exceeded"}, {"Retry-After": "1"}), text_stream(["fine"]))

    response = await gateway.alpha.create(model=MODEL, input="hi")

    assert response.status == COMPLETED and output_text(response) == "fine"
    first, second = fake.requests
    assert first.body == second.body
    assert second.received_at - first.received_at >= 0.95  # Retry-After: 1 was honoured


async def test_503_then_success_is_retried(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(error(503, {"error": "Model at capacity"}), error(502, "Bad Gateway"), text_stream(["fine"]))
    events = await gateway.alpha.stream(model=MODEL, input="hi")
    assert types(events) == [*MESSAGE_EVENTS[:5], *MESSAGE_EVENTS[-4:]]
    assert output_text(final_response(events)) == "fine"
    assert len(fake.requests) == 3


async def test_unreachable_upstream_is_unavailable(tmp_path: Path) -> None:
    venice = backend(f"http://127.0.0.1:{free_port()}/api/v1", connect_timeout=1.0)
    async with serving(tmp_path / "venna.db", venice_router(venice)) as venna:
        caught = await rpc_error(venna.alpha.create(model=MODEL, input="hi"))
    assert caught.code() == UNAVAILABLE


async def test_connect_error_is_retried(tmp_path: Path) -> None:
    port = free_port()
    venice = backend(f"http://127.0.0.1:{port}/api/v1", backoff_base=0.3)
    async with serving(tmp_path / "venna.db", venice_router(venice)) as venna:
        started = time.monotonic()
        creating = asyncio.create_task(venna.alpha.create(model=MODEL, input="hi"))
        await asyncio.sleep(0.1)  # the first attempt is refused; the backend backs off
        late = FakeVenice(port)
        late.queue(text_stream(["made", " it"]))
        await asyncio.to_thread(late.start)
        try:
            response = await creating
        finally:
            await asyncio.to_thread(late.stop)
    assert output_text(response) == "made it"
    [request] = late.requests
    assert request.received_at - started >= 0.25  # after the first backoff, not the first attempt


async def test_sequential_requests_reuse_the_upstream_connection(gateway: Venna, fake: FakeVenice) -> None:
    """A finished stream is read to its end off the critical path, so its connection is pooled."""
    fake.queue(text_stream(["a"]), text_stream(["b"]), text_stream(["c"]))
    for _ in range(3):
        await gateway.alpha.create(model=MODEL, input="x")
    assert len({request.client for request in fake.requests}) == 1


# ---------------------------------------------------------------------------------------------
# Timeouts


async def test_read_timeout_is_deadline_exceeded(tmp_path: Path, fake: FakeVenice) -> None:
    fake.queue(*(Hang(5.0) for _ in range(3)))
    async with serving(
        tmp_path / "venna.db", venice_router(backend(fake.base_url, read_timeout=0.1))
    ) as venna:
        caught = await rpc_error(venna.alpha.create(model=MODEL, input="hi"))
    assert caught.code() == DEADLINE
    assert fake.requests and all(request.disconnected_at is not None for request in fake.requests)


async def test_read_timeout_is_not_retried(tmp_path: Path, fake: FakeVenice) -> None:
    """The upstream may already be working (and billing) on a request that timed out."""
    fake.queue(*(Hang(5.0) for _ in range(3)))
    async with serving(
        tmp_path / "venna.db", venice_router(backend(fake.base_url, read_timeout=0.1))
    ) as venna:
        caught = await rpc_error(venna.alpha.create(model=MODEL, input="hi"))
    assert caught.code() == DEADLINE
    assert len(fake.requests) == 1


async def test_read_timeout_mid_stream_fails_the_response(tmp_path: Path, fake: FakeVenice) -> None:
    stalled = text_stream(["one", " two", " three"]).cut_after(5)
    fake.queue(stalled.with_frames(5, Frame("response.output_text.delta", {"delta": " never"}, delay=5.0)))
    async with serving(
        tmp_path / "venna.db", venice_router(backend(fake.base_url, read_timeout=0.2))
    ) as venna:
        events = await venna.alpha.stream(model=MODEL, input="one two three")
        final = final_response(events)
        assert final.status == FAILED
        assert output_text(final) == "one two"
        assert (await venna.alpha.get(final.id)).status == FAILED
    assert len(fake.requests) == 1
    assert fake.requests[0].disconnected_at is not None


# ---------------------------------------------------------------------------------------------
# Cancellation and background responses


async def test_client_cancel_closes_the_upstream_request_at_once(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(text_stream([f" w{n}" for n in range(100)], delay=0.05))
    call = gateway.alpha.stub.StreamResponse(
        make_request(model=MODEL, input="count slowly"), metadata=gateway.alpha.metadata
    )
    response_id, deltas = "", 0
    async for event in call:
        if event.HasField("created"):
            response_id = event.created.response.id
        deltas += event.HasField("output_text_delta")
        if deltas == 2:
            break

    cancelled_at = time.monotonic()
    call.cancel()

    record = await closes_within(fake, 0, timeout=2.0)
    assert record.disconnected_at is not None, "the fake finished the stream: nothing was closed"
    lag = record.disconnected_at - cancelled_at
    assert lag < 0.1, f"the upstream request was closed {lag * 1000:.0f} ms after the cancel"
    assert record.frames_sent < 20
    await wait_for_status(gateway.alpha, response_id, CANCELLED)
    assert fake.open_requests == []


async def test_background_response_on_venice(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(text_stream(["one", " two", " three"], delay=0.01))

    queued = await gateway.alpha.create(model=MODEL, input="count", background=True)
    assert queued.status == response_pb2.RESPONSE_STATUS_QUEUED and queued.background

    events = await gateway.alpha.resume(queued.id)
    assert_numbered(events)
    assert types(events) == [MESSAGE_EVENTS[0], "response.queued", *MESSAGE_EVENTS[1:]]
    final = final_response(events)
    assert final.status == COMPLETED and output_text(final) == "one two three"
    assert await gateway.alpha.get(queued.id) == final
    assert not VENNA_ONLY_KEYS & set(fake.body())

    # Resuming from the middle replays the rest.
    tail = await gateway.alpha.resume(queued.id, starting_after=5)
    assert [event.sequence_number for event in tail] == list(range(6, len(events)))


async def test_background_cancel_closes_the_upstream_request(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(text_stream([f" w{n}" for n in range(100)], delay=0.05))
    queued = await gateway.alpha.create(model=MODEL, input="count slowly", background=True)
    await fake.wait_for(lambda: bool(fake.requests) and fake.requests[0].frames_sent >= 5)

    cancelled_at = time.monotonic()
    cancelled = await gateway.alpha.cancel(queued.id)

    assert cancelled.status == CANCELLED
    record = await closes_within(fake, 0, timeout=2.0)
    assert record.disconnected_at is not None
    lag = record.disconnected_at - cancelled_at
    assert lag < 0.1, f"the upstream request was closed {lag * 1000:.0f} ms after the cancel"
    assert (await gateway.alpha.get(queued.id)).status == CANCELLED


async def test_an_unstreamed_upstream_answer_is_translated_too(gateway: Venna, fake: FakeVenice) -> None:
    """An upstream that answers with a whole JSON Response (stream ignored) serves the same
    stream and response as one that streams, in the upstream's output order."""
    whole = {
        "id": "resp_chatcmpl-whole",
        "object": "response",
        "created_at": 1767225600,
        "model": UPSTREAM_MODEL,
        "status": "completed",
        "output": [
            {"type": "reasoning", "id": "rs_u", "summary": ["Looked it up."], "encrypted_content": "sig=="},
            {"type": "web_search_call", "id": "ws_u", "status": "completed"},
            {
                "type": "message",
                "id": "msg_u",
                "status": "completed",
                "role": "assistant",
                "content": [
                    {
                        "type": "output_text",
                        "text": "Blue, says Rayleigh.",
                        "annotations": [
                            {
                                "type": "url_citation",
                                "url": "https://example.com/r",
                                "title": "Rayleigh",
                                "start_index": 12,
                                "end_index": 20,
                            }
                        ],
                    }
                ],
            },
        ],
        "usage": {"input_tokens": 9, "output_tokens": 5, "total_tokens": 14},
    }
    fake.queue(error(200, whole))

    events = await gateway.alpha.stream(model=MODEL, input="Why blue?")

    assert_numbered(events)
    final = final_response(events)
    assert final.status == COMPLETED
    assert [item.WhichOneof("item") for item in final.output] == ["reasoning", "web_search_call", "message"]
    assert [summary.text for summary in final.output[0].reasoning.summary] == ["Looked it up."]
    assert output_text(final) == "Blue, says Rayleigh."
    [citation] = final.output[2].message.content[0].output_text.annotations
    assert citation.url_citation.url == "https://example.com/r"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 5)
    deltas = [event.output_text_delta.delta for event in events if event.HasField("output_text_delta")]
    assert "".join(deltas) == "Blue, says Rayleigh."
    assert event_type(events[-1]) == "response.completed"
