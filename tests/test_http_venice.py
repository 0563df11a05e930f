"""The Venice backend end to end through the HTTP shim, as the official openai SDK sees it.

A real Venna (gRPC service and HTTP shim, over both shim transports) routes ``venice/…`` to a
Venice upstream pointed at the fake Venice upstream of tests/fake_venice.py. What comes down is
checked as the SDK parses it, while the checking transport of tests/test_http_sdk.py validates
every JSON body and SSE event against OpenAI's published schemas on its way in; where the SDK
hides what matters (raw frames, the end of a stream), raw httpx reads the wire with the strict
SSE reader of tests/test_http_wire.py. What goes up is checked in the fake's records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import (
    FunctionToolParam,
    Response,
    ResponseCompletedEvent,
    ResponseFailedEvent,
    ResponseFunctionToolCall,
    ResponseFunctionWebSearch,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseStreamEvent,
)

from tests import test_http_sdk as sdk_checks
from tests import test_http_wire as wire
from tests.fake_venice import (
    RAYLEIGH_CITATION,
    RAYLEIGH_TEXT,
    FakeVenice,
    Frame,
    Hang,
    Scenario,
    error,
    function_call_stream,
    raw,
    rayleigh_search,
    reasoning_then_text,
    text_stream,
    venice_stream,
)
from tests.http_harness import TRANSPORTS, HttpVenna
from tests.streams import MESSAGE_EVENTS
from tests.test_venice_backend import (
    ERROR_CASES,
    UPSTREAM_KEY,
    UPSTREAM_MODEL,
    VENNA_ONLY_KEYS,
    assistant,
    free_port,
    system,
    user,
)
from venna.backends.venice import venice_upstream
from venna.server.routing import Router

MODEL = f"venice/{UPSTREAM_MODEL}"
# Served by a second Venice upstream with a short read time-out, for stalled upstreams.
IMPATIENT_MODEL = f"impatient/{UPSTREAM_MODEL}"
IMPATIENT_READ_TIMEOUT = 0.3
# Served by a Venice upstream whose upstream port nothing listens on.
UNREACHABLE_MODEL = f"unreachable/{UPSTREAM_MODEL}"
ID_PREFIXES = {"message": "msg_", "reasoning": "rs_", "function_call": "fc_", "web_search_call": "ws_"}

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER_TOOL: FunctionToolParam = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": WEATHER_PARAMETERS,
    "strict": True,
}
# The same tool in Venice's nested shape, as the upstream must receive it.
WEATHER_TOOL_UPSTREAM = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": WEATHER_PARAMETERS,
        "strict": True,
    },
}


# ---------------------------------------------------------------------------------------------
# Fixtures


def venice_router(base_url: str) -> Router:
    """``venice/…`` and ``impatient/…`` on the fake upstream, ``unreachable/…`` on a dead port."""
    return Router(
        {
            "venice": venice_upstream(base_url, UPSTREAM_KEY, backoff_base=0.01),
            "impatient": venice_upstream(
                base_url,
                UPSTREAM_KEY,
                prefix="impatient/",
                read_timeout=IMPATIENT_READ_TIMEOUT,
                backoff_base=0.01,
            ),
            "unreachable": venice_upstream(
                f"http://127.0.0.1:{free_port()}/api/v1",
                UPSTREAM_KEY,
                prefix="unreachable/",
                connect_timeout=1.0,
                backoff_base=0.01,
            ),
        }
    )


@pytest.fixture(scope="module", params=TRANSPORTS)
def http_venna(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, fake_server: FakeVenice
) -> Iterator[HttpVenna]:
    """Venna over HTTP on both transports, one server per transport for the module."""
    venna = HttpVenna(
        tmp_path_factory.mktemp("venna") / "venna.db",
        transport=str(request.param),
        router=venice_router(fake_server.base_url),
    )
    venna.start()
    try:
        yield venna
    finally:
        venna.stop()


@pytest.fixture
def checks() -> Iterator[sdk_checks.Checks]:
    seen = sdk_checks.Checks()
    yield seen
    assert seen.problems == []
    assert seen.bodies + seen.events > 0, "the test saw no reply"


@pytest.fixture
def client(http_venna: HttpVenna, checks: sdk_checks.Checks) -> Iterator[openai.OpenAI]:
    """The sync SDK, without retries, behind the schema-checking transport."""
    with sdk_checks.sdk(http_venna, checks) as client:
        yield client


@pytest.fixture
def http(http_venna: HttpVenna) -> Iterator[httpx.Client]:
    """Raw HTTP, for what the SDK does not show."""
    with wire.client_for(http_venna, http_venna.alpha) as client:
        yield client


# ---------------------------------------------------------------------------------------------
# Helpers


def stream_events(client: openai.OpenAI, **request: Any) -> list[ResponseStreamEvent]:
    """All events of ``responses.create(..., stream=True)``."""
    with client.responses.create(**request, stream=True) as stream:
        return list(stream)


def types(events: list[ResponseStreamEvent]) -> list[str]:
    return [event.type for event in events]


def completed(events: list[ResponseStreamEvent]) -> Response:
    last = events[-1]
    assert isinstance(last, ResponseCompletedEvent), last.type
    return last.response


def failed(events: list[ResponseStreamEvent]) -> Response:
    last = events[-1]
    assert isinstance(last, ResponseFailedEvent), last.type
    return last.response


def text_deltas(events: list[ResponseStreamEvent]) -> list[str]:
    return [event.delta for event in events if event.type == "response.output_text.delta"]


def assert_numbered(events: list[ResponseStreamEvent]) -> None:
    """Venna's own numbering, whatever Venice's was."""
    assert [event.sequence_number for event in events] == list(range(len(events)))


def assert_venna_ids(response: Response) -> None:
    """The response and its items carry ids Venna made, none of Venice's."""
    assert response.id.startswith("resp_") and "chatcmpl" not in response.id
    output: list[dict[str, Any]] = response.model_dump()["output"]
    for item in output:
        assert str(item["id"]).startswith(ID_PREFIXES[item["type"]]), item
        assert "venice" not in item["id"], item


def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the expected state was not reached in time"
        time.sleep(0.005)


# ---------------------------------------------------------------------------------------------
# Text


def test_streamed_text_has_canonical_events_venna_ids_and_zero_usage_details(
    client: openai.OpenAI, fake: FakeVenice
) -> None:
    fake.queue(text_stream(["The", " sky", " is blue."], first_sequence_number=40))

    events = stream_events(client, model=MODEL, input="Why is the sky blue?")

    assert types(events) == MESSAGE_EVENTS
    assert_numbered(events)
    assert text_deltas(events) == ["The", " sky", " is blue."]
    final = completed(events)
    assert (final.status, final.model, final.output_text) == ("completed", MODEL, "The sky is blue.")
    assert_venna_ids(final)
    assert events[0].type == "response.created" and events[0].response.id == final.id
    [message] = final.output
    assert isinstance(message, ResponseOutputMessage) and message.status == "completed"
    # Venice's usage had no *_details: they are reported, as zeros.
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens) == (11, 7, 18)
    assert final.usage.input_tokens_details.cached_tokens == 0
    assert final.usage.output_tokens_details.reasoning_tokens == 0
    assert client.responses.retrieve(final.id) == final

    [request] = fake.requests
    assert request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert request.body == {"model": UPSTREAM_MODEL, "input": [user("Why is the sky blue?")], "stream": True}


def test_unstreamed_text(client: openai.OpenAI, http: httpx.Client, fake: FakeVenice) -> None:
    fake.queue(text_stream(["one", " answer"]), text_stream(["two", " answers"]))

    response = client.responses.create(model=MODEL, input="hi")

    assert (response.status, response.output_text) == ("completed", "one answer")
    assert_venna_ids(response)
    assert response.usage is not None
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert fake.body()["stream"] is True  # the upstream is always asked to stream

    # On the wire, the details are there as objects, not left out.
    body = wire.create(http, model=MODEL, input="hi")
    assert wire.output_text(body) == "two answers"
    usage = body["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (11, 7, 18)
    assert usage["input_tokens_details"]["cached_tokens"] == 0
    assert usage["output_tokens_details"]["reasoning_tokens"] == 0


def test_slow_upstream_is_streamed_as_it_comes(client: openai.OpenAI, fake: FakeVenice) -> None:
    fake.queue(text_stream(["one", " two", " three", " four"], delay=0.15))

    arrivals: list[float] = []
    with client.responses.create(model=MODEL, input="slowly", stream=True) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                arrivals.append(time.monotonic())
    ended = time.monotonic()

    assert len(arrivals) == 4
    # Buffered, the deltas would come together at the end; flushed, they are spread over the
    # upstream's three pauses of 150 ms (bounds loose enough for a loaded machine).
    assert arrivals[-1] - arrivals[0] >= 0.25, arrivals
    assert ended - arrivals[0] >= 0.25, "the first delta waited for the rest"


def test_done_comments_and_unknown_events_are_ignored(http: httpx.Client, fake: FakeVenice) -> None:
    fake.queue(
        text_stream(["one", " two", " three"]).with_frames(
            1,
            Frame("response.in_progress", {"type": "response.in_progress", "sequence_number": 1}),
            Frame("response.venice.balance", {"type": "response.venice.balance", "usd": "12.50"}),
            raw(": keep-alive\n\n"),
            Frame("response.future_feature.delta", {"type": "response.future_feature.delta", "delta": "?"}),
        )
    )

    with http.stream("POST", "/responses", json={"model": MODEL, "input": "count", "stream": True}) as reply:
        text = reply.read().decode()
        sse = wire.read_sse(reply)

    assert sse.types == MESSAGE_EVENTS
    assert sse.comments == []
    for upstream_only in ("[DONE]", "keep-alive", "venice.balance", "future_feature", "resp_chatcmpl"):
        assert upstream_only not in text
    assert wire.output_text(sse.events[-1]["response"]) == "one two three"


# ---------------------------------------------------------------------------------------------
# Reasoning, tools, web search


REASONING_USAGE = {
    "input_tokens": 20,
    "input_tokens_details": {"cached_tokens": 5},
    "output_tokens": 80,
    "output_tokens_details": {"reasoning_tokens": 40},
    "total_tokens": 100,
}
ENCRYPTED = "gAAAAB-opaque+signature/with=padding=="


def test_reasoning_then_text(client: openai.OpenAI, checks: sdk_checks.Checks, fake: FakeVenice) -> None:
    fake.queue(
        reasoning_then_text(
            ["Rayleigh ", "scattering ", "favours blue."],
            ["Because", " of Rayleigh", " scattering."],
            encrypted_content=ENCRYPTED,
            usage=REASONING_USAGE,
        )
    )

    events = stream_events(
        client, model=MODEL, input="Why is the sky blue?", include=["reasoning.encrypted_content"]
    )

    assert_numbered(events)
    summary_deltas = [
        event.delta for event in events if event.type == "response.reasoning_summary_text.delta"
    ]
    assert summary_deltas == ["Rayleigh ", "scattering ", "favours blue."]
    kinds = types(events)
    # The reasoning item is finished before the message starts.
    assert kinds.index("response.reasoning_summary_text.done") < kinds.index("response.content_part.added")
    final = completed(events)
    assert final.status == "completed"
    assert_venna_ids(final)
    reasoning, message = final.output
    assert isinstance(reasoning, ResponseReasoningItem)
    assert [(part.type, part.text) for part in reasoning.summary] == [
        ("summary_text", "Rayleigh scattering favours blue.")
    ]
    assert reasoning.encrypted_content == ENCRYPTED
    assert isinstance(message, ResponseOutputMessage)
    assert final.output_text == "Because of Rayleigh scattering."
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens) == (20, 80, 100)
    assert final.usage.input_tokens_details.cached_tokens == 5
    assert final.usage.output_tokens_details.reasoning_tokens == 40
    assert client.responses.retrieve(final.id, include=["reasoning.encrypted_content"]) == final

    # The reasoning goes back up on the next turn: summary as plain strings, signature verbatim.
    fake.queue(text_stream(["Red."]))
    follow_up = client.responses.create(model=MODEL, input="And at sunset?", previous_response_id=final.id)
    assert follow_up.output_text == "Red."
    assert fake.body()["input"] == [
        user("Why is the sky blue?"),
        {
            "type": "reasoning",
            "id": reasoning.id,
            "summary": ["Rayleigh scattering favours blue."],
            "encrypted_content": ENCRYPTED,
        },
        assistant("Because of Rayleigh scattering."),
        user("And at sunset?"),
    ]


def test_function_call_round_trip(client: openai.OpenAI, fake: FakeVenice) -> None:
    fake.queue(function_call_stream("get_weather", '{"city": "Paris"}', call_id="call_abc123"))

    events = stream_events(
        client,
        model=MODEL,
        input="Weather in Paris?",
        instructions="Use the tools.",
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        metadata={"trace": "t-1"},
        store=True,
    )

    assert_numbered(events)
    assert types(events)[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    streamed = "".join(
        event.delta for event in events if event.type == "response.function_call_arguments.delta"
    )
    assert streamed == '{"city": "Paris"}'
    asked = completed(events)
    assert_venna_ids(asked)
    assert asked.metadata == {"trace": "t-1"} and asked.instructions == "Use the tools."
    [call] = asked.output
    assert isinstance(call, ResponseFunctionToolCall)
    assert (call.name, call.call_id, call.status) == ("get_weather", "call_abc123", "completed")
    assert json.loads(call.arguments) == {"city": "Paris"}
    first = fake.body()
    assert first["input"] == [system("Use the tools."), user("Weather in Paris?")]
    assert first["tools"] == [WEATHER_TOOL_UPSTREAM]
    assert first["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert not VENNA_ONLY_KEYS & set(first)

    fake.queue(text_stream(["21 degrees", " in Paris."]))
    answered = client.responses.create(
        model=MODEL,
        previous_response_id=asked.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}],
        instructions="Use the tools.",
        tools=[WEATHER_TOOL],
        metadata={"trace": "t-2"},
    )

    assert (answered.status, answered.output_text) == ("completed", "21 degrees in Paris.")
    assert answered.previous_response_id == asked.id
    second = fake.body()
    # The whole history goes up, for the upstream keeps nothing; Venna's own fields do not.
    assert second["input"] == [
        system("Use the tools."),
        user("Weather in Paris?"),
        {
            "type": "function_call",
            "call_id": "call_abc123",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_abc123", "output": '{"temperature": 21}'},
    ]
    assert second["tools"] == [WEATHER_TOOL_UPSTREAM]
    assert not VENNA_ONLY_KEYS & set(second)
    assert set(second) == {"model", "input", "stream", "tools"}


def test_web_search_with_citations(
    client: openai.OpenAI, checks: sdk_checks.Checks, fake: FakeVenice
) -> None:
    text, citation = RAYLEIGH_TEXT, RAYLEIGH_CITATION
    fake.queue(rayleigh_search())

    events = stream_events(client, model="venice/qwen3:enable_web_search=on", input="Why blue?")

    assert fake.body()["model"] == "qwen3:enable_web_search=on"
    # Venice's response.web_search.done carries no sequence number: Venna numbers everything.
    assert_numbered(events)
    assert "response.web_search_call.completed" in types(events)
    final = completed(events)
    assert final.status == "completed"
    assert_venna_ids(final)
    search, message = final.output
    assert isinstance(search, ResponseFunctionWebSearch) and search.status == "completed"
    assert isinstance(message, ResponseOutputMessage)
    [part] = message.content
    assert isinstance(part, ResponseOutputText) and part.text == text
    [annotation] = part.annotations
    assert annotation.type == "url_citation"
    assert (annotation.url, annotation.title, annotation.start_index, annotation.end_index) == (
        citation.url,
        citation.title,
        citation.start_index,
        citation.end_index,
    )
    assert client.responses.retrieve(final.id) == final


# ---------------------------------------------------------------------------------------------
# Errors before the stream


@dataclass(frozen=True)
class HttpErrorCase:
    """Upstream answers, and the OpenAI error the SDK must raise for them."""

    replies: tuple[Scenario, ...]
    exception: type[openai.APIStatusError]
    status: int
    type: str
    code: str
    param: str | None = None
    says: tuple[str, ...] = ()
    attempts: int = 1
    retry_after: str | None = None


def upstream(
    name: str, exception: type[openai.APIStatusError], status: int, type_: str, code: str, **more: Any
) -> HttpErrorCase:
    """The scenario ``name`` of the gRPC-level table, with what HTTP makes of it."""
    case = ERROR_CASES[name]
    more = {"says": case.says, "attempts": case.attempts, **more}
    return HttpErrorCase(case.replies, exception, status, type_, code, **more)


BAD = (openai.BadRequestError, 400, "invalid_request_error")
SERVER = (openai.InternalServerError, 503, "server_error", "server_error")
HTTP_ERROR_CASES = {
    "400-string": upstream("400-string", *BAD, "invalid_request"),
    "400-detailed": upstream("400-detailed", *BAD, "invalid_request"),
    "400-detailed-string-details": upstream("400-detailed-string-details", *BAD, "invalid_request"),
    "400-openai-shaped": upstream("400-openai-shaped", *BAD, "context_length_exceeded", param="input"),
    "404": upstream("404", *BAD, "model_not_found", param="model"),
    "422": upstream("422", *BAD, "invalid_request"),
    "402": upstream("402", openai.RateLimitError, 429, "insufficient_quota", "insufficient_quota"),
    "429-retry-after-too-long": upstream(
        "429-retry-after-too-long",
        openai.RateLimitError,
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        says=("Rate limit exceeded",),
        retry_after="30",
    ),
    "429-exhausted": upstream(
        "429-exhausted",
        openai.RateLimitError,
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        says=("Model overloaded",),
        retry_after="0",
    ),
    "500": upstream("500", *SERVER, says=("HTTP 500",)),
    "502-x3": upstream("502-x3", *SERVER, says=("HTTP 502",)),
    "503-x3": upstream("503-x3", *SERVER),
    "504-x3": upstream("504-x3", openai.InternalServerError, 504, "server_error", "server_error"),
    # Our key is bad, not the caller's: a server error, never a 401 or 403, and never retried.
    **{
        str(status): HttpErrorCase(
            (error(status, {"error": "Authentication failed"}),),
            openai.InternalServerError,
            500,
            "server_error",
            "server_error",
            says=("upstream credentials were rejected",),
        )
        for status in (401, 403)
    },
}


def assert_openai_error(caught: openai.APIStatusError, case: HttpErrorCase) -> None:
    assert type(caught) is case.exception, caught
    assert caught.status_code == case.status
    body = sdk_checks.error_body(caught)
    assert (body["type"], body["code"], body["param"]) == (case.type, case.code, case.param)
    for fragment in case.says:
        assert fragment in body["message"], body
    assert UPSTREAM_KEY not in body["message"]
    assert caught.response.headers.get("retry-after") == case.retry_after


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("case", list(HTTP_ERROR_CASES.values()), ids=list(HTTP_ERROR_CASES))
def test_upstream_errors_are_openai_errors(
    client: openai.OpenAI, fake: FakeVenice, case: HttpErrorCase, stream: bool
) -> None:
    fake.queue(*case.replies)

    with pytest.raises(openai.APIStatusError) as caught:
        client.responses.create(model=MODEL, input="hi", stream=stream)

    # A stream that fails before its first event is answered with the JSON error.
    assert caught.value.response.headers["content-type"].startswith("application/json")
    assert_openai_error(caught.value, case)
    assert len(fake.requests) == case.attempts
    assert fake.pending == 0


def test_retried_upstream_errors_are_not_seen(client: openai.OpenAI, fake: FakeVenice) -> None:
    fake.queue(
        error(503, {"error": "Model at capacity"}),
        error(429, {"error": "Rate limit exceeded"}, {"Retry-After": "0"}),
        text_stream(["fine"]),
    )

    response = client.responses.create(model=MODEL, input="hi")

    assert (response.status, response.output_text) == ("completed", "fine")
    assert len(fake.requests) == 3
    assert all(request.body == fake.requests[0].body for request in fake.requests)


def test_read_timeout_is_a_gateway_timeout(client: openai.OpenAI, fake: FakeVenice) -> None:
    fake.queue(*(Hang(5.0) for _ in range(3)))

    with pytest.raises(openai.InternalServerError) as caught:
        client.responses.create(model=IMPATIENT_MODEL, input="hi")

    assert caught.value.status_code == 504
    body = sdk_checks.error_body(caught.value)
    assert (body["type"], body["code"]) == ("server_error", "server_error")
    # Never retried (the upstream may be working on it), and the hung request was let go.
    [request] = fake.requests
    until(lambda: request.disconnected_at is not None, timeout=2.0)


def test_unreachable_upstream_is_unavailable(client: openai.OpenAI, fake: FakeVenice) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.responses.create(model=UNREACHABLE_MODEL, input="hi", stream=True)

    assert caught.value.status_code == 503
    body = sdk_checks.error_body(caught.value)
    assert (body["type"], body["code"]) == ("server_error", "server_error")
    assert fake.requests == []


def test_upstream_failure_before_any_output_is_a_server_error(
    client: openai.OpenAI, fake: FakeVenice
) -> None:
    fake.queue(venice_stream(terminal="failed", failure=("inference_failed", "Inference failed.")))

    with pytest.raises(openai.InternalServerError) as caught:
        client.responses.create(model=MODEL, input="hi", stream=True)

    assert caught.value.status_code == 500
    body = sdk_checks.error_body(caught.value)
    assert (body["type"], body["code"], body["message"]) == (
        "server_error",
        "inference_failed",
        "Inference failed.",
    )
    assert len(fake.requests) == 1  # the upstream answered: nothing to retry


# ---------------------------------------------------------------------------------------------
# Failures during the stream


def test_upstream_failure_mid_stream_ends_with_response_failed(
    client: openai.OpenAI, fake: FakeVenice
) -> None:
    fake.queue(
        venice_stream(
            words=["partial", " answer"],
            terminal="failed",
            failure=("rate_limit_exceeded", "Model overloaded, try again."),
        )
    )

    events = stream_events(client, model=MODEL, input="hi")

    assert_numbered(events)
    assert "error" not in types(events)  # the failure is reported once, in the terminal event
    assert text_deltas(events) == ["partial", " answer"]
    final = failed(events)
    assert final.status == "failed" and final.error is not None
    assert (final.error.code, final.error.message) == ("rate_limit_exceeded", "Model overloaded, try again.")
    assert final.output_text == "partial answer"
    stored = client.responses.retrieve(final.id)
    assert stored.status == "failed" and stored.error == final.error
    assert stored == final


@pytest.mark.parametrize(
    ("model", "broken"),
    [
        pytest.param(MODEL, text_stream(["one", " two", " three"]).cut_after(5), id="connection-dropped"),
        pytest.param(
            MODEL, venice_stream(words=["one", " two"], terminal="none", done=True), id="done-too-early"
        ),
        pytest.param(
            MODEL, venice_stream(words=["one", " two"], terminal="none", done=False), id="clean-eof"
        ),
        pytest.param(
            IMPATIENT_MODEL,
            text_stream(["one", " two", " three"])
            .cut_after(5)
            .with_frames(5, Frame("response.output_text.delta", {"delta": " never"}, delay=5.0)),
            id="stalled",
        ),
    ],
)
def test_stream_cut_off_ends_with_response_failed(
    client: openai.OpenAI, http: httpx.Client, fake: FakeVenice, model: str, broken: Scenario
) -> None:
    fake.queue(broken)

    # Read strictly off the wire: nothing may follow the terminal event.
    sse = wire.post_stream(http, model=model, input="one two three")

    assert sse.types[-1] == "response.failed"
    assert not {"error", "response.completed"} & set(sse.types)
    final = sse.events[-1]["response"]
    assert final["status"] == "failed"
    assert final["error"]["code"] == "server_error" and final["error"]["message"]
    assert wire.output_text(final).startswith("one two")
    stored = client.responses.retrieve(final["id"])
    assert stored.status == "failed" and stored.error is not None
    assert stored.error.code == "server_error"
    assert stored.to_dict() == final
    [request] = fake.requests  # bytes reached the client: never retried
    until(lambda: request.closed, timeout=2.0)


# ---------------------------------------------------------------------------------------------
# Background responses and cancellation


def test_background_response_polls_to_completed(client: openai.OpenAI, fake: FakeVenice) -> None:
    fake.queue(text_stream(["one", " two", " three"], delay=0.02))

    queued = client.responses.create(model=MODEL, input="count", background=True)

    assert queued.status in ("queued", "in_progress") and queued.background is True
    seen: set[str | None] = {queued.status}
    deadline = time.monotonic() + 10
    while True:
        response = client.responses.retrieve(queued.id)
        seen.add(response.status)
        if response.status not in ("queued", "in_progress") or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert response.status == "completed"
    assert seen <= {"queued", "in_progress", "completed"}
    assert response.output_text == "one two three"
    assert_venna_ids(response)
    assert not VENNA_ONLY_KEYS & set(fake.body())

    # Its stream is kept: replayed whole, Venna-numbered.
    with client.responses.retrieve(queued.id, stream=True) as replay:
        events = list(replay)
    assert types(events) == [MESSAGE_EVENTS[0], "response.queued", *MESSAGE_EVENTS[1:]]
    assert_numbered(events)
    assert completed(events) == response


def test_background_cancel_closes_the_upstream_request(client: openai.OpenAI, fake: FakeVenice) -> None:
    fake.queue(text_stream([f" w{n}" for n in range(100)], delay=0.05))
    queued = client.responses.create(model=MODEL, input="count slowly", background=True)
    until(lambda: bool(fake.requests) and fake.requests[0].frames_sent >= 5)

    started = time.monotonic()
    cancelled = client.responses.cancel(queued.id)

    assert cancelled.status == "cancelled"
    [request] = fake.requests
    until(lambda: request.closed, timeout=2.0)
    assert request.disconnected_at is not None, "the fake finished the stream: nothing was closed"
    # Loose bound (a loaded machine): the whole stream would take five seconds.
    assert request.disconnected_at - started < 1.0
    assert request.frames_sent < 50
    assert fake.open_requests == []
    stored = client.responses.retrieve(queued.id)
    assert stored.status == "cancelled"
    assert 0 < len(stored.output_text.split()) < 100


def test_client_disconnect_closes_the_upstream_request(
    http_venna: HttpVenna, client: openai.OpenAI, fake: FakeVenice
) -> None:
    fake.queue(text_stream([f" w{n}" for n in range(60)], delay=0.05))

    response_id, deltas = "", 0
    with client.responses.create(model=MODEL, input="count slowly", stream=True) as stream:
        for event in stream:
            if event.type == "response.created":
                response_id = event.response.id
            deltas += event.type == "response.output_text.delta"
            if deltas == 2:
                break
    left = time.monotonic()

    stopped = sdk_checks.wait_for(client, response_id, {"cancelled", "completed", "failed"})
    assert stopped.status == "cancelled"
    [upstream_request] = fake.requests
    until(lambda: upstream_request.closed, timeout=1.5)
    assert upstream_request.disconnected_at is not None, "the fake finished the stream: nothing was closed"
    assert upstream_request.disconnected_at - left < 1.0
    assert upstream_request.frames_sent < 40
