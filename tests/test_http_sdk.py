"""The HTTP shim driven by the official openai SDK, as JSON clients use it.

Every body and every SSE event the SDK receives passes through a transport that validates it
against OpenAI's published schemas (tests/openai_schema.py) and checks the SSE framing, so a
test that only looks at what the SDK made of a reply still proves the reply's shape.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import pytest
from openai.types.responses import (
    FunctionToolParam,
    Response,
    ResponseFunctionToolCall,
    ResponseInputParam,
    ResponseStreamEvent,
)

from tests.http_harness import TRANSPORTS, HttpVenna
from tests.openai_schema import validate, validate_response, validate_stream_event
from tests.streams import MESSAGE_EVENTS

WEATHER_TOOL: FunctionToolParam = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"input": {"type": "string"}},
        "required": ["input"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture(scope="module", params=TRANSPORTS)
def http_venna(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpVenna]:
    """Venna over HTTP on both transports, one server per transport for the module.

    Overrides the harness's per-test fixture to keep the suite fast; every test makes its own
    responses, so sharing the server does not couple them.
    """
    venna = HttpVenna(tmp_path_factory.mktemp("venna") / "venna.db", transport=str(request.param))
    venna.start()
    try:
        yield venna
    finally:
        venna.stop()


# --------------------------------------------------------------------------- schema checks


@dataclass
class Checks:
    """What the checking transports saw in one test; the test fails if anything was off."""

    bodies: int = 0
    events: int = 0
    problems: list[str] = field(default_factory=list)

    def body(self, request: httpx2.Request, status: int, content: bytes) -> None:
        where = f"{request.method} {request.url.path} -> {status}"
        try:
            data = json.loads(content)
            path = request.url.path
            if status >= 400:
                validate(data, "ErrorResponse")
                assert set(data["error"]) >= {"message", "type", "param", "code"}, data
            elif path.endswith("/input_items"):
                validate(data, "ResponseItemList")
            elif request.method == "DELETE":
                assert data == {"id": path.rsplit("/", 1)[-1], "object": "response", "deleted": True}
            elif path.startswith("/v1/responses"):
                validate_response(data)
            else:
                raise AssertionError("no schema for this route")
        except Exception as error:
            self.problems.append(f"{where}: {error}")
            raise
        self.bodies += 1

    def request_id(self, request: httpx2.Request, response: httpx2.Response) -> None:
        if not str(response.headers.get("x-request-id", "")).startswith("req_"):
            self.problems.append(f"{request.method} {request.url.path}: no x-request-id")
            raise AssertionError(self.problems[-1])

    def event(self, name: str | None, data: str | None, previous: int | None) -> int:
        """Checks one SSE event; returns its sequence number."""
        try:
            assert name is not None and data is not None, f"event {name!r} without data, or data alone"
            payload = json.loads(data)
            assert payload["type"] == name, f"'event: {name}' carries type {payload['type']}"
            validate_stream_event(payload)
            sequence_number = payload["sequence_number"]
            assert isinstance(sequence_number, int)
            if previous is not None:
                assert sequence_number == previous + 1, f"{sequence_number} follows {previous}"
        except Exception as error:
            self.problems.append(f"SSE event {name}: {error} in {data}")
            raise
        self.events += 1
        return sequence_number


class SseChecker:
    """Parses an SSE body as it streams and checks each event as soon as it is complete."""

    def __init__(self, checks: Checks) -> None:
        self._checks = checks
        self._buffer = b""
        self._previous: int | None = None

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            name: str | None = None
            data: str | None = None
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    continue  # a comment, such as ": keep-alive"
                key, _, value = line.partition(": ")
                if key == "event" and name is None:
                    name = value
                elif key == "data" and data is None:
                    data = value
                else:
                    self._checks.problems.append(f"unexpected SSE line {line!r}")
                    raise AssertionError(f"unexpected SSE line {line!r}")
            if name is None and data is None:
                continue
            self._previous = self._checks.event(name, data, self._previous)

    def end(self) -> None:
        if self._buffer.strip():
            self._checks.problems.append(f"SSE body ends inside an event: {self._buffer!r}")


class CheckedStream(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, checker: SseChecker) -> None:
        self._inner = inner
        self._checker = checker

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._checker.feed(chunk)
            yield chunk
        self._checker.end()

    def close(self) -> None:
        self._inner.close()


class AsyncCheckedStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, checker: SseChecker) -> None:
        self._inner = inner
        self._checker = checker

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._checker.feed(chunk)
            yield chunk
        self._checker.end()

    async def aclose(self) -> None:
        await self._inner.aclose()


def _is_sse(response: httpx2.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


class CheckingTransport(httpx2.BaseTransport):
    """The default transport, validating every reply on its way to the SDK."""

    def __init__(self, checks: Checks) -> None:
        self._inner = httpx2.HTTPTransport(verify=False)  # plain HTTP on loopback; skips loading CAs
        self._checks = checks

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = self._inner.handle_request(request)
        self._checks.request_id(request, response)
        if _is_sse(response):
            assert isinstance(response.stream, httpx2.SyncByteStream)
            response.stream = CheckedStream(response.stream, SseChecker(self._checks))
        else:
            self._checks.body(request, response.status_code, response.read())
        return response

    def close(self) -> None:
        self._inner.close()


class AsyncCheckingTransport(httpx2.AsyncBaseTransport):
    def __init__(self, checks: Checks) -> None:
        self._inner = httpx2.AsyncHTTPTransport(verify=False)
        self._checks = checks

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        self._checks.request_id(request, response)
        if _is_sse(response):
            assert isinstance(response.stream, httpx2.AsyncByteStream)
            response.stream = AsyncCheckedStream(response.stream, SseChecker(self._checks))
        else:
            self._checks.body(request, response.status_code, await response.aread())
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.fixture
def checks() -> Iterator[Checks]:
    seen = Checks()
    yield seen
    assert seen.problems == []
    assert seen.bodies + seen.events > 0, "the test saw no reply"


def sdk(venna: HttpVenna, checks: Checks, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=venna.base_url,
        api_key=key or venna.alpha,
        max_retries=0,
        http_client=openai.DefaultHttpxClient(transport=CheckingTransport(checks), timeout=15),
    )


def async_sdk(venna: HttpVenna, checks: Checks, key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=venna.base_url,
        api_key=key or venna.alpha,
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(transport=AsyncCheckingTransport(checks), timeout=15),
    )


@pytest.fixture
def client(http_venna: HttpVenna, checks: Checks) -> Iterator[openai.OpenAI]:
    with sdk(http_venna, checks) as client:
        yield client


@pytest.fixture
async def aclient(http_venna: HttpVenna, checks: Checks) -> AsyncIterator[openai.AsyncOpenAI]:
    async with async_sdk(http_venna, checks) as client:
        yield client


# --------------------------------------------------------------------------- helpers


def words(count: int) -> str:
    return " ".join(f"w{index}" for index in range(count))


def without_parsed(data: Any) -> Any:
    """A ParsedResponse's dump without the SDK's own ``parsed`` fields, as a Response dumps."""
    if isinstance(data, dict):
        return {key: without_parsed(value) for key, value in data.items() if key != "parsed"}
    if isinstance(data, list):
        return [without_parsed(value) for value in data]
    return data


def wait_for(client: openai.OpenAI, response_id: str, statuses: set[str], timeout: float = 10) -> Response:
    deadline = time.monotonic() + timeout
    while True:
        response = client.responses.retrieve(response_id)
        if response.status in statuses or time.monotonic() > deadline:
            return response
        time.sleep(0.02)


def error_body(error: openai.APIStatusError) -> dict[str, Any]:
    """The ``error`` object of an SDK exception, as the server sent it."""
    assert isinstance(error.body, dict)
    assert set(error.body) == {"message", "type", "param", "code"}, error.body
    return error.body


# --------------------------------------------------------------------------- create / retrieve


def test_create_and_retrieve(client: openai.OpenAI) -> None:
    response = client.responses.create(model="echo", input="hello sdk world")
    assert response.status == "completed"
    assert response.output_text == "hello sdk world"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (3, 3)
    assert response.usage.total_tokens == 6
    assert response.id.startswith("resp_") and response.object == "response"
    assert client.responses.retrieve(response.id) == response


def test_create_with_messages_instructions_and_metadata(client: openai.OpenAI) -> None:
    conversation: ResponseInputParam = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "input_text", "text": "second question here"}]},
    ]
    response = client.responses.create(
        model="venna-1",
        input=conversation,
        instructions="be brief",
        metadata={"team": "qa", "ticket": "42"},
    )
    assert response.output_text == "second question here"
    assert response.instructions == "be brief"
    assert response.metadata == {"team": "qa", "ticket": "42"}
    assert response.model == "venna-1"
    assert response.usage is not None
    # The whole context counts: instructions (2) and three messages (2 + 2 + 3).
    assert response.usage.input_tokens == 9
    assert client.responses.retrieve(response.id).metadata == {"team": "qa", "ticket": "42"}


def test_store_false_is_neither_retrievable_nor_chainable(client: openai.OpenAI) -> None:
    response = client.responses.create(model="echo", input="forget me", store=False)
    assert response.to_dict()["store"] is False  # the SDK's Response model has no `store` field
    assert response.output_text == "forget me"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="echo", input="again", previous_response_id=response.id)
    assert caught.value.code == "previous_response_not_found"


def test_delete_then_retrieve_is_not_found(client: openai.OpenAI) -> None:
    response = client.responses.create(model="echo", input="short lived")
    client.responses.delete(response.id)  # the SDK returns None; the body is checked by the transport
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)


def test_max_output_tokens_cuts_to_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(model="echo", input=words(20), max_output_tokens=16)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == words(16)
    assert response.usage is not None and response.usage.output_tokens == 16
    assert response.max_output_tokens == 16


# --------------------------------------------------------------------------- background


def test_background_polling_until_completed(client: openai.OpenAI) -> None:
    queued = client.responses.create(
        model="echo:delay_ms=20", input="four words in background", background=True
    )
    assert queued.status == "queued" and queued.background is True
    assert queued.output == []
    seen = set()
    deadline = time.monotonic() + 10
    while True:
        response = client.responses.retrieve(queued.id)
        seen.add(response.status)
        if response.status not in ("queued", "in_progress") or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert response.status == "completed"
    assert seen <= {"queued", "in_progress", "completed"}
    assert response.output_text == "four words in background"
    assert response.completed_at is not None and response.completed_at >= response.created_at


def test_cancel_background_response(client: openai.OpenAI) -> None:
    queued = client.responses.create(model="echo:delay_ms=30", input=words(200), background=True)
    time.sleep(0.1)
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.id == queued.id
    assert cancelled.status == "cancelled"
    # The work has stopped: the stored response stays cancelled and stops growing.
    first = client.responses.retrieve(queued.id)
    time.sleep(0.1)
    later = client.responses.retrieve(queued.id)
    assert first.status == later.status == "cancelled"
    assert later.output_text == first.output_text
    assert len(later.output_text.split()) < 200
    # Cancelling again answers the response unchanged.
    assert client.responses.cancel(queued.id).status == "cancelled"


def test_cancel_finished_or_foreground_response(client: openai.OpenAI) -> None:
    background = client.responses.create(model="echo", input="done quickly", background=True)
    finished = wait_for(client, background.id, {"completed"})
    assert finished.status == "completed"
    assert client.responses.cancel(background.id) == finished
    foreground = client.responses.create(model="echo", input="not cancellable")
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.cancel(foreground.id)
    assert caught.value.status_code == 400
    assert caught.value.type == "invalid_request_error"
    assert client.responses.retrieve(foreground.id).status == "completed"


# --------------------------------------------------------------------------- input items


def test_input_items_auto_pagination(client: openai.OpenAI) -> None:
    texts = [f"message {index}" for index in range(5)]
    conversation: ResponseInputParam = [{"role": "user", "content": text} for text in texts]
    response = client.responses.create(model="echo", input=conversation)

    page = client.responses.input_items.list(response.id, limit=2)
    assert len(page.data) == 2 and page.has_more is True
    extra = page.model_extra or {}  # the SDK's page models only data and has_more
    assert (extra["first_id"], extra["last_id"]) == (page.data[0].id, page.data[1].id)

    def listed(order: str | None) -> list[tuple[str, str]]:
        items = (
            client.responses.input_items.list(response.id, limit=2)
            if order is None
            else client.responses.input_items.list(response.id, limit=2, order="asc")
        )
        result = []
        for item in items:  # follows the pages
            assert item.type == "message" and item.role == "user"
            assert item.content[0].type == "input_text"
            result.append((item.id, item.content[0].text))
        return result

    ascending = listed("asc")
    descending = listed(None)  # the default order is newest first
    assert [text for _, text in ascending] == texts
    assert descending == ascending[::-1]
    ids = [item_id for item_id, _ in ascending]
    assert len(set(ids)) == 5
    assert listed("asc") == ascending  # ids are stable
    # The answer is not an input item.
    assert response.output[0].id not in ids


def test_chaining_three_deep(client: openai.OpenAI) -> None:
    first = client.responses.create(model="echo", input="a b", instructions="not carried over")
    second = client.responses.create(model="echo", input="c d e", previous_response_id=first.id)
    third = client.responses.create(model="echo", input="f", previous_response_id=second.id)
    assert [r.output_text for r in (first, second, third)] == ["a b", "c d e", "f"]
    assert third.previous_response_id == second.id and second.previous_response_id == first.id
    usage = [r.usage for r in (first, second, third)]
    assert all(u is not None for u in usage)
    # first: instructions (3) + "a b"; then each adds the previous input and output, without
    # the first response's instructions.
    assert [u.input_tokens for u in usage if u] == [5, 2 + 2 + 3, 2 + 2 + 3 + 3 + 1]
    assert [u.output_tokens for u in usage if u] == [2, 3, 1]
    # Each response stores only its own input.
    assert len(client.responses.input_items.list(third.id).data) == 1


# --------------------------------------------------------------------------- streaming


def test_stream_helper_final_response(client: openai.OpenAI, checks: Checks) -> None:
    with client.responses.stream(model="echo", input="one two three") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert checks.events == len(MESSAGE_EVENTS)  # each one was validated on its way in
    assert [event.type for event in events] == MESSAGE_EVENTS
    assert [event.sequence_number for event in events] == list(range(len(MESSAGE_EVENTS)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas == ["one", " two", " three"]
    assert final.output_text == "one two three"
    assert final.status == "completed"
    retrieved = client.responses.retrieve(final.id)
    assert without_parsed(final.model_dump()) == retrieved.model_dump()


def test_raw_stream_true(client: openai.OpenAI) -> None:
    stream = client.responses.create(model="echo", input="one two three", stream=True)
    assert isinstance(stream, openai.Stream)
    with stream:
        events: list[ResponseStreamEvent] = list(stream)
    assert [event.type for event in events] == MESSAGE_EVENTS
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == "one two three"
    assert client.responses.retrieve(completed.response.id) == completed.response


def test_stream_that_fails_midway(client: openai.OpenAI) -> None:
    with client.responses.stream(model="echo:fail_after=2", input="one two three four") as stream:
        events = list(stream)
        with pytest.raises(RuntimeError):  # the SDK's helper wants response.completed
            stream.get_final_response()
    assert events[-1].type == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed"
    assert failed.error is not None and failed.error.code == "server_error"
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas == ["one", " two"]
    assert client.responses.retrieve(failed.id).status == "failed"


def test_resume_background_stream_after_sequence_number(client: openai.OpenAI) -> None:
    queued = client.responses.create(model="echo:delay_ms=20", input=words(8), background=True)
    with client.responses.stream(response_id=queued.id, starting_after=4) as stream:
        events = list(stream)
        final = stream.get_final_response()
    numbers = [event.sequence_number for event in events]
    assert numbers == list(range(5, 5 + len(events)))
    assert events[0].type == "response.output_text.delta"  # 0 created, 1 queued, 2 in_progress, ...
    assert events[-1].type == "response.completed"
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == words(8)
    assert final.status == "completed" and final.output_text == words(8)
    assert without_parsed(final.model_dump()) == client.responses.retrieve(queued.id).model_dump()


def test_raw_resume_filters_on_the_server(client: openai.OpenAI) -> None:
    queued = client.responses.create(model="echo", input="a b c", background=True)
    wait_for(client, queued.id, {"completed"})
    with client.responses.retrieve(queued.id, stream=True, starting_after=5) as stream:
        numbers = [event.sequence_number for event in stream]
    with client.responses.retrieve(queued.id, stream=True) as stream:
        everything = [event.sequence_number for event in stream]
    assert everything[0] == 0 and numbers[0] == 6
    assert numbers == everything[6:]


# --------------------------------------------------------------------------- tools


def test_function_calling_round_trip(client: openai.OpenAI) -> None:
    asked = client.responses.create(
        model="echo", input="weather in Paris", tools=[WEATHER_TOOL], tool_choice="required"
    )
    assert [item.type for item in asked.output] == ["function_call"]
    call = asked.output[0]
    assert isinstance(call, ResponseFunctionToolCall)
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"input": "weather in Paris"}
    assert call.call_id
    answered = client.responses.create(
        model="echo",
        previous_response_id=asked.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[WEATHER_TOOL],
    )
    assert answered.output_text == "sunny"
    assert answered.status == "completed"

    named = client.responses.create(
        model="echo",
        input="and in Rome",
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    assert isinstance(named.output[0], ResponseFunctionToolCall)
    assert json.loads(named.output[0].arguments) == {"input": "and in Rome"}


def test_function_calling_with_manual_conversation_state(client: openai.OpenAI) -> None:
    """The docs' pattern without previous_response_id: send the output items back as input."""
    conversation: list[Any] = [{"role": "user", "content": "weather in Oslo"}]
    asked = client.responses.create(
        model="echo", input=conversation, tools=[WEATHER_TOOL], tool_choice="required"
    )
    call = asked.output[0]
    assert isinstance(call, ResponseFunctionToolCall)
    conversation += asked.output  # the SDK's own models, sent back as they are
    conversation.append({"type": "function_call_output", "call_id": call.call_id, "output": "cloudy"})
    answered = client.responses.create(model="echo", input=conversation, tools=[WEATHER_TOOL])
    assert answered.output_text == "cloudy"
    assert answered.previous_response_id is None
    # Every item came back as input, the function call included.
    listed = [item.type for item in client.responses.input_items.list(answered.id, order="asc")]
    assert listed == ["message", "function_call", "function_call_output"]


# --------------------------------------------------------------------------- errors


def test_not_found_is_typed(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve("resp_missing")
    assert caught.value.status_code == 404
    body = error_body(caught.value)
    assert body["type"] == "invalid_request_error"
    assert "resp_missing" in body["message"]


def test_authentication_errors(http_venna: HttpVenna, checks: Checks) -> None:
    with (
        sdk(http_venna, checks, key="vk_not_a_key") as client,
        pytest.raises(openai.AuthenticationError) as bad,
    ):
        client.responses.create(model="echo", input="hello")
    assert bad.value.status_code == 401
    assert bad.value.code == "invalid_api_key"
    assert error_body(bad.value)["type"] == "invalid_request_error"
    with sdk(http_venna, checks) as client, pytest.raises(openai.AuthenticationError) as missing:
        # The SDK insists on a key; dropping the header sends none.
        client.responses.create(model="echo", input="hello", extra_headers={"Authorization": openai.Omit()})
    assert missing.value.status_code == 401
    error_body(missing.value)


@pytest.mark.parametrize(
    ("arguments", "param", "code"),
    [
        ({"previous_response_id": "resp_unknown"}, "previous_response_id", "previous_response_not_found"),
        ({"temperature": 2.5}, "temperature", None),
        ({"top_p": 1.5}, "top_p", None),
        ({"model": "no-such-model"}, "model", "model_not_found"),
        ({"extra_body": {"bogus": 1}}, "bogus", "unknown_parameter"),
        ({"max_output_tokens": 15}, "max_output_tokens", None),
        ({"model": "echo", "background": True, "store": False}, "store", None),
    ],
)
def test_bad_requests_are_typed(
    client: openai.OpenAI, arguments: dict[str, Any], param: str, code: str | None
) -> None:
    request: dict[str, Any] = {"model": "echo", "input": "hello", **arguments}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**request)
    error = caught.value
    assert error.status_code == 400
    assert error.param == param
    assert error.type == "invalid_request_error"
    if code is not None:
        assert error.code == code
    body = error_body(error)
    assert isinstance(body["message"], str) and body["message"]
    assert (body["param"], body["code"]) == (error.param, error.code)


def test_other_workspace_ids_are_not_found(
    http_venna: HttpVenna, client: openai.OpenAI, checks: Checks
) -> None:
    owned = client.responses.create(model="echo:delay_ms=10", input=words(20), background=True)
    missing = "resp_" + "0" * 48

    def failures(beta: openai.OpenAI, response_id: str) -> list[tuple[int, dict[str, Any]]]:
        calls = [
            lambda: beta.responses.retrieve(response_id),
            lambda: beta.responses.delete(response_id),
            lambda: beta.responses.cancel(response_id),
            lambda: beta.responses.input_items.list(response_id),
            lambda: beta.responses.create(model="echo", input="x", previous_response_id=response_id),
        ]
        seen = []
        for call in calls:
            with pytest.raises(openai.APIStatusError) as caught:
                call()
            body = error_body(caught.value)
            seen.append(
                (caught.value.status_code, {**body, "message": body["message"].replace(response_id, "ID")})
            )
        return seen

    with sdk(http_venna, checks, key=http_venna.beta) as beta:
        foreign = failures(beta, owned.id)
        unknown = failures(beta, missing)
    assert [status for status, _ in foreign] == [404, 404, 404, 404, 400]
    assert foreign == unknown  # exactly as an unknown id, but for the id in the message
    # Nothing beta did touched alpha's response.
    finished = wait_for(client, owned.id, {"completed"})
    assert finished.status == "completed"
    assert finished.output_text == words(20)


# --------------------------------------------------------------------------- async client


async def test_async_create_retrieve_delete(aclient: openai.AsyncOpenAI) -> None:
    response = await aclient.responses.create(model="echo", input="hello async world")
    assert response.output_text == "hello async world"
    assert await aclient.responses.retrieve(response.id) == response
    await aclient.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError) as caught:
        await aclient.responses.retrieve(response.id)
    assert caught.value.status_code == 404


async def test_async_stream_helper_and_raw_stream(aclient: openai.AsyncOpenAI) -> None:
    async with aclient.responses.stream(model="echo", input="one two three") as stream:
        types = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert types == MESSAGE_EVENTS
    assert final.output_text == "one two three"
    retrieved = await aclient.responses.retrieve(final.id)
    assert without_parsed(final.model_dump()) == retrieved.model_dump()

    raw = await aclient.responses.create(model="echo", input="one two three", stream=True)
    assert isinstance(raw, openai.AsyncStream)
    async with raw:
        events = [event async for event in raw]
    assert [event.type for event in events] == MESSAGE_EVENTS


async def test_async_input_items_pagination(aclient: openai.AsyncOpenAI) -> None:
    conversation: ResponseInputParam = [{"role": "user", "content": f"part {index}"} for index in range(5)]
    response = await aclient.responses.create(model="echo", input=conversation)
    texts = []
    async for item in aclient.responses.input_items.list(response.id, limit=2, order="asc"):
        assert item.type == "message" and item.content[0].type == "input_text"
        texts.append(item.content[0].text)
    assert texts == [f"part {index}" for index in range(5)]


async def test_async_background_cancel_and_resume(aclient: openai.AsyncOpenAI) -> None:
    queued = await aclient.responses.create(model="echo:delay_ms=30", input=words(200), background=True)
    async with aclient.responses.stream(response_id=queued.id, starting_after=2) as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                break  # it is running: now cancel it
    cancelled = await aclient.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    assert 0 < len(cancelled.output_text.split()) < 200
    foreground = await aclient.responses.create(model="echo", input="hi")
    with pytest.raises(openai.BadRequestError):
        await aclient.responses.cancel(foreground.id)


async def test_async_errors_are_typed(
    http_venna: HttpVenna, aclient: openai.AsyncOpenAI, checks: Checks
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await aclient.responses.create(model="echo", input="x", extra_body={"bogus": 1})
    assert (caught.value.param, caught.value.code) == ("bogus", "unknown_parameter")
    with pytest.raises(openai.BadRequestError) as chained:
        await aclient.responses.create(model="echo", input="x", previous_response_id="resp_unknown")
    assert chained.value.code == "previous_response_not_found"
    assert chained.value.param == "previous_response_id"
    async with async_sdk(http_venna, checks, key="vk_wrong") as wrong:
        with pytest.raises(openai.AuthenticationError) as denied:
            await wrong.responses.retrieve("resp_anything")
    assert denied.value.status_code == 401


def test_checks_catch_a_reply_off_the_schema() -> None:
    """The checking transport is not a no-op: a Response without its id fails it."""
    seen = Checks()
    with pytest.raises(AssertionError, match="not a valid Response"):
        seen.body(
            httpx2.Request("GET", "http://test/v1/responses/resp_x"),
            200,
            json.dumps({"object": "response", "status": "completed"}).encode(),
        )
    assert seen.problems
