"""The HTTP shim on the wire, as curl sees it: SSE framing, status codes, headers, error bodies.

Every JSON body and every SSE event these tests read is validated against OpenAI's published
schemas (tests/openai_schema.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.http_harness import TRANSPORTS, HttpVenna, running
from tests.openai_schema import validate, validate_response, validate_stream_event
from tests.streams import MESSAGE_EVENTS, TERMINAL_EVENTS

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"input": {"type": "string"}}},
}


@pytest.fixture(scope="module", params=TRANSPORTS)
def http_venna(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpVenna]:
    """Venna over HTTP on both transports, one server per transport for the module.

    Overrides the harness's per-test fixture to keep the suite fast; every test makes its own
    responses, so sharing the server does not couple them.
    """
    yield from running(HttpVenna(tmp_path_factory.mktemp("venna") / "venna.db", transport=str(request.param)))


@pytest.fixture(scope="module", params=TRANSPORTS)
def tuned_venna(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpVenna]:
    """A Venna with a short keep-alive interval and a small body limit."""
    venna = HttpVenna(
        tmp_path_factory.mktemp("tuned") / "venna.db",
        transport=str(request.param),
        keepalive_seconds=0.2,
        max_body_bytes=1000,
    )
    yield from running(venna)


def client_for(venna: HttpVenna, key: str | None) -> httpx.Client:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    # verify=False: plain HTTP on loopback, and it spares loading the CA bundle per client.
    return httpx.Client(base_url=venna.base_url, headers=headers, timeout=10, verify=False)


@pytest.fixture
def http(http_venna: HttpVenna) -> Iterator[httpx.Client]:
    with client_for(http_venna, http_venna.alpha) as client:
        yield client


@pytest.fixture
def root(http_venna: HttpVenna) -> Iterator[httpx.Client]:
    """A client for paths outside /v1."""
    with httpx.Client(base_url=http_venna.base_url.removesuffix("/v1"), timeout=10, verify=False) as client:
        yield client


# --------------------------------------------------------------------------- reading replies


def request_id(response: httpx.Response) -> str:
    value = str(response.headers.get("x-request-id", ""))
    assert value.startswith("req_"), f"no x-request-id on {response.request.method} {response.request.url}"
    return value


def body(response: httpx.Response, schema: str, status: int = 200) -> dict[str, Any]:
    """The JSON body of a reply, checked against the named OpenAI schema."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    request_id(response)
    data = response.json()
    assert isinstance(data, dict)
    if schema == "Response":
        validate_response(data)
    else:
        validate(data, schema)
    return data


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The ``error`` object of an OpenAI error reply, with all four of its keys."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    request_id(response)
    data = response.json()
    validate(data, "ErrorResponse")
    assert set(data) == {"error"}
    err = data["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return dict(err)


@dataclass
class Sse:
    """A parsed event stream, with when each event arrived and where comments appeared."""

    events: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    # (number of events before the comment, the comment line)
    comments: list[tuple[int, str]] = field(default_factory=list)

    @property
    def types(self) -> list[str]:
        return [event["type"] for event in self.events]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["type"] == kind]


def read_sse(response: httpx.Response, stop_after: int | None = None) -> Sse:
    """Reads an SSE reply strictly: ``event:`` then ``data:`` then a blank line, or a comment.

    Each event's name must equal its JSON type, it must fit OpenAI's schema for that type,
    sequence numbers must follow each other without gaps, and nothing may follow a terminal event.
    """
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    request_id(response)
    sse = Sse()
    name: str | None = None
    data: str | None = None
    for line in response.iter_lines():
        if line.startswith(":"):
            assert name is None and data is None, "a comment inside an event"
            sse.comments.append((len(sse.events), line))
        elif line.startswith("event: "):
            assert name is None and data is None, f"unexpected {line!r}"
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            assert name is not None and data is None, f"unexpected {line!r}"
            data = line.removeprefix("data: ")
        elif line == "":
            if name is None and data is None:
                continue  # the blank line that ends a comment
            assert name is not None and data is not None
            event = json.loads(data)
            assert event["type"] == name
            validate_stream_event(event)
            if sse.events:
                assert event["sequence_number"] == sse.events[-1]["sequence_number"] + 1
                assert sse.events[-1]["type"] not in TERMINAL_EVENTS, "an event after the terminal one"
            sse.events.append(event)
            sse.arrivals.append(time.monotonic())
            name = data = None
            if stop_after is not None and len(sse.events) >= stop_after:
                return sse
        else:
            raise AssertionError(f"not an SSE line: {line!r}")
    assert name is None and data is None, "the stream ended inside an event"
    return sse


def post_stream(http: httpx.Client, **request: Any) -> Sse:
    with http.stream("POST", "/responses", json={**request, "stream": True}) as response:
        return read_sse(response)


def get_stream(http: httpx.Client, response_id: str, **params: Any) -> Sse:
    with http.stream("GET", f"/responses/{response_id}", params={"stream": "true", **params}) as response:
        return read_sse(response)


def create(http: httpx.Client, **request: Any) -> dict[str, Any]:
    return body(http.post("/responses", json=request), "Response")


def retrieve(http: httpx.Client, response_id: str) -> dict[str, Any]:
    return body(http.get(f"/responses/{response_id}"), "Response")


def wait_for(http: httpx.Client, response_id: str, statuses: set[str], timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = retrieve(http, response_id)
        if response["status"] in statuses or time.monotonic() > deadline:
            return response
        time.sleep(0.02)


def output_text(response: dict[str, Any]) -> str:
    return "".join(
        part["text"]
        for item in response["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )


def words(count: int) -> str:
    return " ".join(f"w{index}" for index in range(count))


def assert_events_agree_with_output(sse: Sse) -> None:
    """output_index, item ids and the .done payloads agree with the final response."""
    final = sse.events[-1]["response"]
    output = final["output"]
    for event in sse.events:
        if "output_index" not in event:
            continue
        item = output[event["output_index"]]
        if "item" in event:
            assert event["item"]["id"] == item["id"]
        else:
            assert event["item_id"] == item["id"]
    for event in sse.of_type("response.output_item.done"):
        assert event["item"] == output[event["output_index"]]


# --------------------------------------------------------------------------- SSE framing


def test_sse_framing_and_canonical_order(http: httpx.Client) -> None:
    with http.stream(
        "POST", "/responses", json={"model": "echo", "input": "one two three", "stream": True}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        request_id(r)
        raw = r.read().decode()
    assert "[DONE]" not in raw
    blocks = raw.split("\n\n")
    assert blocks[-1] == "", "the body ends with the blank line after the last event"
    events = []
    for block in blocks[:-1]:
        event_line, data_line = block.split("\n")  # exactly two lines per event
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        event = json.loads(data_line.removeprefix("data: "))
        assert event["type"] == event_line.removeprefix("event: ")
        validate_stream_event(event)
        events.append(event)
    assert [event["type"] for event in events] == MESSAGE_EVENTS
    assert [event["sequence_number"] for event in events] == list(range(len(events)))

    created, completed = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    assert completed["status"] == "completed" and completed["id"] == created["id"]
    sse = Sse(events=events)
    assert_events_agree_with_output(sse)
    deltas = "".join(event["delta"] for event in sse.of_type("response.output_text.delta"))
    assert deltas == sse.of_type("response.output_text.done")[0]["text"] == "one two three"
    assert sse.of_type("response.content_part.done")[0]["part"]["text"] == "one two three"
    assert output_text(completed) == "one two three"
    # The stored response is the completed snapshot.
    assert retrieve(http, completed["id"]) == completed


def test_function_call_events_agree_with_output(http: httpx.Client) -> None:
    sse = post_stream(
        http, model="echo", input="weather in Paris please", tools=[WEATHER_TOOL], tool_choice="required"
    )
    types = sse.types
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(types[3:-3]) == {"response.function_call_arguments.delta"}
    assert len(types[3:-3]) > 1  # the arguments stream in pieces
    assert_events_agree_with_output(sse)
    call = sse.events[-1]["response"]["output"][0]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    arguments = "".join(event["delta"] for event in sse.of_type("response.function_call_arguments.delta"))
    assert arguments == sse.of_type("response.function_call_arguments.done")[0]["arguments"]
    assert json.loads(arguments) == json.loads(call["arguments"]) == {"input": "weather in Paris please"}
    assert call["call_id"]
    assert retrieve(http, sse.events[0]["response"]["id"]) == sse.events[-1]["response"]


def test_events_are_flushed_as_they_happen(http: httpx.Client) -> None:
    started = time.monotonic()
    sse = post_stream(http, model="echo:delay_ms=300", input="one two three four")
    ended = time.monotonic()
    deltas = [
        arrival
        for arrival, event in zip(sse.arrivals, sse.events, strict=True)
        if event["type"] == "response.output_text.delta"
    ]
    assert len(deltas) == 4
    assert ended - started >= 0.85  # three pauses of 300 ms
    # Buffering would deliver the deltas together at the end. Flushed, they are spread over the
    # three pauses (bounds loose enough for a loaded machine to delay any single arrival).
    assert deltas[-1] - deltas[0] >= 0.5, deltas
    assert ended - deltas[0] >= 0.5, "the first delta waited for the rest"


def test_keep_alive_comments_during_silence(tuned_venna: HttpVenna) -> None:
    with client_for(tuned_venna, tuned_venna.alpha) as http:
        sse = post_stream(http, model="echo:delay_ms=700", input="slow words")
    first, second = (
        index for index, event in enumerate(sse.events) if event["type"] == "response.output_text.delta"
    )
    between = [line for position, line in sse.comments if first < position <= second]
    assert between, f"no comment between the deltas: {sse.comments}"
    assert set(between) == {": keep-alive"}
    assert sse.types[-1] == "response.completed"


def test_incomplete_stream_ends_with_response_incomplete(http: httpx.Client) -> None:
    sse = post_stream(http, model="echo", input=words(20), max_output_tokens=16)
    assert sse.types[-1] == "response.incomplete"
    assert not {"response.completed", "response.failed"} & set(sse.types)
    final = sse.events[-1]["response"]
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert output_text(final) == words(16)
    assert retrieve(http, final["id"]) == final


def test_unstored_stream(http: httpx.Client) -> None:
    sse = post_stream(http, model="echo", input="not kept", store=False)
    assert sse.types == MESSAGE_EVENTS[:6] + MESSAGE_EVENTS[-4:]
    final = sse.events[-1]["response"]
    assert final["store"] is False and output_text(final) == "not kept"
    assert error(http.get(f"/responses/{final['id']}"), 404)["type"] == "invalid_request_error"


def test_text_round_trips_exactly(http: httpx.Client) -> None:
    text = 'héllo wörld 🎉 "quoted" \\back\\slash 日本語'
    sse = post_stream(http, model="echo", input=text)
    assert "".join(event["delta"] for event in sse.of_type("response.output_text.delta")) == text
    assert output_text(retrieve(http, sse.events[-1]["response"]["id"])) == text


# --------------------------------------------------------------------------- resumption


def test_resume_replays_a_background_response(http: httpx.Client) -> None:
    queued = create(http, model="echo", input="one two three", background=True)
    assert queued["status"] == "queued" and queued["background"] is True
    done = wait_for(http, queued["id"], {"completed"})
    full = get_stream(http, queued["id"])
    assert full.types[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert full.types[3:] == MESSAGE_EVENTS[2:]
    assert full.events[0]["sequence_number"] == 0
    assert full.events[0]["response"]["status"] == "queued"
    assert full.events[-1]["response"] == done
    assert_events_agree_with_output(full)
    for after in (0, 5, len(full.events) - 2):
        tail = get_stream(http, queued["id"], starting_after=after)
        assert tail.events == full.events[after + 1 :]


def test_resume_follows_a_running_response_live(http: httpx.Client) -> None:
    queued = create(http, model="echo:delay_ms=150", input=words(6), background=True)
    sse = get_stream(http, queued["id"], starting_after=2)
    assert sse.events[0]["sequence_number"] == 3
    assert sse.types[-1] == "response.completed"
    # It follows the response as it runs (five pauses of 150 ms), rather than waiting for its end.
    assert sse.arrivals[-1] - sse.arrivals[0] > 0.3
    text = "".join(event["delta"] for event in sse.of_type("response.output_text.delta"))
    assert text == words(6)
    assert retrieve(http, queued["id"]) == sse.events[-1]["response"]


def test_background_stream_survives_a_disconnect(http_venna: HttpVenna, http: httpx.Client) -> None:
    """A background response streamed at creation goes on when its client leaves, and can be resumed."""
    request = {"model": "echo:delay_ms=20", "input": words(20), "background": True, "stream": True}
    with (
        client_for(http_venna, http_venna.alpha) as streaming,
        streaming.stream("POST", "/responses", json=request) as response,
    ):
        seen = read_sse(response, stop_after=5)
    assert seen.types[:3] == ["response.created", "response.queued", "response.in_progress"]
    response_id = seen.events[0]["response"]["id"]
    rest = get_stream(http, response_id, starting_after=seen.events[-1]["sequence_number"])
    assert rest.events[0]["sequence_number"] == seen.events[-1]["sequence_number"] + 1
    assert rest.types[-1] == "response.completed"
    final = rest.events[-1]["response"]
    assert final["status"] == "completed" and output_text(final) == words(20)
    assert retrieve(http, response_id) == final


def test_resume_of_a_cancelled_response_ends(http: httpx.Client) -> None:
    queued = create(http, model="echo:delay_ms=30", input=words(200), background=True)
    time.sleep(0.1)
    cancelled = body(http.post(f"/responses/{queued['id']}/cancel"), "Response")
    assert cancelled["status"] == "cancelled"
    sse = get_stream(http, queued["id"])  # ends, rather than waiting forever
    assert sse.types[0] == "response.created"
    assert not TERMINAL_EVENTS & set(sse.types)  # the API defines no event for a cancellation
    assert retrieve(http, queued["id"])["status"] == "cancelled"


def test_resume_of_a_foreground_or_foreign_response_is_json(
    http_venna: HttpVenna, http: httpx.Client
) -> None:
    foreground = create(http, model="echo", input="not resumable")
    err = error(http.get(f"/responses/{foreground['id']}", params={"stream": "true"}), 400)
    assert err["type"] == "invalid_request_error"
    background = create(http, model="echo", input="mine", background=True)
    with client_for(http_venna, http_venna.beta) as beta:
        foreign = error(beta.get(f"/responses/{background['id']}", params={"stream": "true"}), 404)
        unknown = error(beta.get("/responses/resp_unknown", params={"stream": "true"}), 404)
    assert foreign["type"] == unknown["type"] and foreign["code"] == unknown["code"]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("content", "param", "code"),
    [
        pytest.param(b'{"model": "echo", "input": ', None, None, id="invalid-json"),
        pytest.param(b"[1, 2, 3]", None, None, id="json-array"),
        pytest.param(b'"just a string"', None, None, id="json-string"),
        pytest.param(
            b'{"model": "echo", "input": "x", "temperature": "hot"}', "temperature", "invalid_type", id="type"
        ),
        pytest.param(
            b'{"model": "echo", "input": "x", "bogus": 1}', "bogus", "unknown_parameter", id="unknown"
        ),
        pytest.param(
            b'{"model": "echo", "input": "x", "stream": "yes"}', "stream", "invalid_type", id="stream"
        ),
        pytest.param(
            b'{"model": "echo", "input": [{"type": "nope"}]}', "input[0].type", "invalid_value", id="item"
        ),
        pytest.param(
            b'{"model": "echo", "input": "x", "metadata": {"a": 1}}', "metadata.a", "invalid_type", id="meta"
        ),
        pytest.param(b'{"model": "echo", "input": 5}', "input", "invalid_type", id="input-number"),
        pytest.param(b'{"input": "x"}', "model", None, id="no-model"),
        pytest.param(b'{"model": "echo", "input": "x", "temperature": 2.5}', "temperature", None, id="range"),
        pytest.param(
            b'{"model": "echo", "input": "x", "max_output_tokens": 15}', "max_output_tokens", None, id="max"
        ),
        pytest.param(b'{"model": "gpt-nope", "input": "x"}', "model", "model_not_found", id="model"),
        pytest.param(
            b'{"model": "echo", "input": "x", "previous_response_id": "resp_unknown"}',
            "previous_response_id",
            "previous_response_not_found",
            id="previous",
        ),
    ],
)
def test_bad_request_bodies_are_400(
    http: httpx.Client, content: bytes, param: str | None, code: str | None
) -> None:
    response = http.post("/responses", content=content, headers={"content-type": "application/json"})
    request_id(response)
    err = error(response, 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code


@pytest.mark.parametrize(
    ("content", "param"),
    [
        pytest.param(b'{"model": "echo", "input": "\\ud800"}', "input[0].content[0].text", id="text"),
        pytest.param(
            b'{"model": "echo", "input": "x", "instructions": "a\\ud83d"}', "instructions", id="half"
        ),
        pytest.param(b'{"model": "ech\\udc00o", "input": "x"}', "model", id="model"),
        pytest.param(b'{"model": "echo", "input": "x", "metadata": {"\\udfff": "v"}}', "metadata", id="key"),
        pytest.param(
            b'{"model": "echo", "input": "x", "metadata": {"k": "\\ud800"}}', "metadata.k", id="value"
        ),
        pytest.param(
            b'{"model": "echo", "input": "x", "tools": [{"type": "function", "name": "f", '
            b'"parameters": {"d": "\\ud800"}}]}',
            "tools[0].parameters",
            id="struct",
        ),
    ],
)
def test_lone_surrogate_escape_is_400(http: httpx.Client, content: bytes, param: str) -> None:
    """Valid JSON that is not valid Unicode text: a client mistake, not a server error."""
    response = http.post("/responses", content=content, headers={"content-type": "application/json"})
    err = error(response, 400)
    assert (err["param"], err["code"]) == (param, "invalid_value")
    # The server is still fine for the next request.
    assert create(http, model="echo", input="still here")["status"] == "completed"


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(b"Bearer \xff\xfe", id="non-ascii"),
        pytest.param(b"Bearer vk_\x01", id="control"),
        pytest.param(b"Bearer " + b"k" * 5000, id="long"),
    ],
)
def test_malformed_authorization_header_is_401(http_venna: HttpVenna, authorization: bytes) -> None:
    """Bytes gRPC metadata cannot carry get the same 401 on both transports, never a 500."""
    with httpx.Client(base_url=http_venna.base_url, timeout=10, verify=False) as http:
        response = http.get("/responses/resp_anything", headers={b"authorization": authorization})
    assert error(response, 401)["type"] == "invalid_request_error"


def test_missing_model_is_missing_required_parameter(http: httpx.Client) -> None:
    err = error(http.post("/responses", json={"input": "x"}), 400)
    assert (err["param"], err["code"]) == ("model", "missing_required_parameter")


@pytest.mark.parametrize(
    "request_body",
    [
        pytest.param(
            {"stream": None},
            id="stream",
        ),
        pytest.param(
            {"prompt": None},
            id="prompt",
        ),
        pytest.param(
            {"conversation": None},
            id="conversation",
        ),
        pytest.param(
            {"input": [{"type": "message", "role": "user", "content": "x", "phase": None}]},
            id="message-phase",
        ),
        pytest.param({"store": None, "background": None, "previous_response_id": None}, id="others"),
    ],
)
def test_null_is_not_given(http: httpx.Client, request_body: dict[str, Any]) -> None:
    """OpenAI's schema makes these nullable; clients such as the SDK send null for a None argument."""
    request = {"model": "echo", "input": "null fields", **request_body}
    validate(request, "CreateResponse")
    created = create(http, **request)
    assert created["status"] == "completed"


def test_unsupported_parameters_are_refused_by_name(http: httpx.Client) -> None:
    for name, value in (("prompt", {"id": "pmpt_1"}), ("moderation", {"input": True})):
        err = error(http.post("/responses", json={"model": "echo", "input": "x", name: value}), 400)
        assert (err["param"], err["code"]) == (name, "unsupported_parameter")


def test_authentication_errors(http_venna: HttpVenna) -> None:
    for key in (None, "vk_not_a_real_key"):
        with client_for(http_venna, key) as http:
            created = http.post("/responses", json={"model": "echo", "input": "x"})
            request_id(created)
            err = error(created, 401)
            assert err["type"] == "invalid_request_error"
            error(http.get("/responses/resp_anything"), 401)
            # Streaming asks fail as JSON too, before any event.
            error(http.post("/responses", json={"model": "echo", "input": "x", "stream": True}), 401)


def test_oversized_body_is_413(tuned_venna: HttpVenna) -> None:
    with client_for(tuned_venna, tuned_venna.alpha) as http:
        assert create(http, model="echo", input="small enough")["status"] == "completed"
        big = json.dumps({"model": "echo", "input": "x" * 2000}).encode()
        declared = http.post("/responses", content=big, headers={"content-type": "application/json"})
        request_id(declared)
        assert error(declared, 413)["type"] == "invalid_request_error"

        def chunks() -> Iterator[bytes]:  # no content-length: the limit holds while reading
            for start in range(0, len(big), 100):
                yield big[start : start + 100]

        chunked = http.post("/responses", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in chunked.request.headers
        error(chunked, 413)


def test_body_over_four_mib_is_not_rate_limited(http_venna: HttpVenna) -> None:
    """A body under the shim's limit (32 MiB by default) but over gRPC's default message size."""
    text = "x" * 4_300_000
    with client_for(http_venna, http_venna.alpha) as http:
        response = http.post("/responses", json={"model": "echo", "input": text})
    assert response.status_code == 200, response.text[:300]
    assert output_text(response.json()) == text


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/chat/completions"), ("GET", "/files"), ("PUT", "/nothing/here")]
)
def test_unknown_endpoint_is_501(http: httpx.Client, method: str, path: str) -> None:
    response = http.request(method, path, json={})
    err = error(response, 501)
    assert err["code"] == "not_implemented"
    assert response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/responses", "POST"),
        ("GET", "/responses", "POST"),
        ("PATCH", "/responses/resp_x", "DELETE, GET, HEAD"),
        ("GET", "/responses/resp_x/cancel", "POST"),
    ],
)
def test_known_path_with_another_method_is_405(
    http: httpx.Client, method: str, path: str, allowed: str
) -> None:
    """A path the API has, asked with a method it does not take: 405 naming the ones it does."""
    response = http.request(method, path, json={})
    err = error(response, 405)
    assert (err["type"], err["code"]) == ("invalid_request_error", "method_not_allowed")
    assert response.headers["allow"] == allowed


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),  # the 501 catch-all
        ("GET", "/healthz"),
        ("GET", "/nowhere"),  # Starlette's own 404
        ("PATCH", "/healthz"),  # and 405
    ],
)
def test_every_reply_has_a_request_id(root: httpx.Client, method: str, path: str) -> None:
    response = root.request(method, path)
    request_id(response)
    assert response.status_code != 500


def test_healthz(root: httpx.Client) -> None:
    response = root.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_request_ids_are_unique(http: httpx.Client) -> None:
    replies = [
        http.post("/responses", json={"model": "echo", "input": "x"}),
        http.post("/responses", json={"model": "echo", "input": "x"}),
        http.get("/responses/resp_unknown"),
        http.post("/responses", json={"bogus": True}),
    ]
    ids = [request_id(reply) for reply in replies]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("request_body", "status", "param"),
    [
        ({"previous_response_id": "resp_unknown"}, 400, "previous_response_id"),
        ({"model": "gpt-nope"}, 400, "model"),
        ({"temperature": 9}, 400, "temperature"),
    ],
)
def test_stream_that_fails_before_its_first_event_is_json(
    http: httpx.Client, request_body: dict[str, Any], status: int, param: str
) -> None:
    with http.stream(
        "POST", "/responses", json={"model": "echo", "input": "x", "stream": True, **request_body}
    ) as r:
        r.read()
    request_id(r)
    assert error(r, status)["param"] == param


def test_failure_mid_stream_ends_with_response_failed(http: httpx.Client) -> None:
    sse = post_stream(http, model="echo:fail_after=2", input="one two three four")
    assert sse.types[-1] == "response.failed"
    assert not {"response.completed", "response.output_text.done"} & set(sse.types)
    failed = sse.events[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "server_error"
    assert [event["delta"] for event in sse.of_type("response.output_text.delta")] == ["one", " two"]
    stored = retrieve(http, failed["id"])
    assert stored["status"] == "failed" and stored["error"] == failed["error"]


def test_delete(http: httpx.Client) -> None:
    response_id = create(http, model="echo", input="delete me")["id"]
    deleted = http.delete(f"/responses/{response_id}")
    assert deleted.status_code == 200
    request_id(deleted)
    assert deleted.json() == {"id": response_id, "object": "response", "deleted": True}
    assert error(http.get(f"/responses/{response_id}"), 404)["type"] == "invalid_request_error"
    error(http.delete(f"/responses/{response_id}"), 404)
    error(http.get(f"/responses/{response_id}/input_items"), 404)


def test_not_found_body(http: httpx.Client) -> None:
    response = http.get("/responses/resp_unknown")
    request_id(response)
    err = error(response, 404)
    assert err["type"] == "invalid_request_error"
    assert "resp_unknown" in err["message"]


# --------------------------------------------------------------------------- input items


def test_input_items_listing(http: httpx.Client) -> None:
    conversation = [{"role": "user", "content": f"item {index}"} for index in range(3)]
    response_id = create(http, model="echo", input=conversation)["id"]
    listed = body(
        http.get(
            f"/responses/{response_id}/input_items",
            params={"include[]": "message.input_image.image_url", "order": "asc", "limit": 2},
        ),
        "ResponseItemList",
    )
    assert listed["object"] == "list"
    assert [item["content"][0]["text"] for item in listed["data"]] == ["item 0", "item 1"]
    assert listed["has_more"] is True
    assert (listed["first_id"], listed["last_id"]) == (listed["data"][0]["id"], listed["data"][1]["id"])
    rest = body(
        http.get(
            f"/responses/{response_id}/input_items",
            params={"order": "asc", "after": listed["last_id"]},
        ),
        "ResponseItemList",
    )
    assert [item["content"][0]["text"] for item in rest["data"]] == ["item 2"]
    assert rest["has_more"] is False
    newest_first = body(http.get(f"/responses/{response_id}/input_items"), "ResponseItemList")
    assert [item["content"][0]["text"] for item in newest_first["data"]] == ["item 2", "item 1", "item 0"]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"include[]": "message.bogus"}, "include"),
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"order": "sideways"}, "order"),
    ],
)
def test_input_items_bad_query_is_400(http: httpx.Client, params: dict[str, Any], param: str) -> None:
    response_id = create(http, model="echo", input="x")["id"]
    response = http.get(f"/responses/{response_id}/input_items", params=params)
    request_id(response)
    err = error(response, 400)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


# --------------------------------------------------------------------------- disconnect


def test_client_disconnect_cancels_the_response(http_venna: HttpVenna, http: httpx.Client) -> None:
    with (
        client_for(http_venna, http_venna.alpha) as streaming,
        streaming.stream(
            "POST", "/responses", json={"model": "echo:delay_ms=50", "input": words(200), "stream": True}
        ) as response,
    ):
        sse = read_sse(response, stop_after=6)
    # Leaving the blocks closed the connection mid-stream.
    assert sse.types[-1] == "response.output_text.delta"
    response_id = sse.events[0]["response"]["id"]
    stopped = wait_for(http, response_id, {"cancelled", "completed", "failed"}, timeout=5)
    assert stopped["status"] == "cancelled"
    time.sleep(0.15)  # three deltas' worth: a response still running would grow meanwhile
    later = retrieve(http, response_id)
    assert later["status"] == "cancelled"
    assert output_text(later) == output_text(stopped)
    assert len(output_text(later).split()) < 200


# --------------------------------------------------------------------------- schema deviations


def test_response_body_validates_as_sent(http: httpx.Client) -> None:
    """Response.user is a string or absent in OpenAI's schema, never null."""
    response = http.post("/responses", json={"model": "echo", "input": "as sent"})
    assert response.status_code == 200
    validate_response(response.json())
    assert "user" not in response.json()
    with_user = http.post("/responses", json={"model": "echo", "input": "as sent", "user": "u-1"}).json()
    validate_response(with_user)
    assert with_user["user"] == "u-1"


def test_usage_before_the_end_validates(http: httpx.Client) -> None:
    """Response.usage is null while the response runs, as OpenAI's service sends it and Open
    Responses requires (OpenAI's published schema would have it absent: the one documented
    deviation), and valid under both schemas."""
    with http.stream("POST", "/responses", json={"model": "echo", "input": "early", "stream": True}) as r:
        created = json.loads(
            next(line for line in r.iter_lines() if line.startswith("data: ")).removeprefix("data: ")
        )
    assert created["type"] == "response.created"
    validate_stream_event(created)
    assert created["response"]["usage"] is None
    queued = http.post("/responses", json={"model": "echo", "input": "queued", "background": True}).json()
    assert queued["status"] == "queued"
    assert queued["usage"] is None
    validate_response(queued)


def test_json_schema_format_validates(http: httpx.Client) -> None:
    """A json_schema format's unset description is null and its strict false (Open Responses
    requires both), valid under both schemas."""
    text = {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}}}
    response = http.post("/responses", json={"model": "echo", "input": "structured", "text": text})
    assert response.status_code == 200
    validate_response(response.json())
    assert response.json()["text"]["format"]["name"] == "answer"
    assert response.json()["text"]["format"]["description"] is None
    assert response.json()["text"]["format"]["strict"] is False


# --------------------------------------------------------------------------- settings beyond OpenAI's


def test_stop_as_one_string_or_a_list(http: httpx.Client) -> None:
    """``stop`` takes one string or a list, as OpenAI's chat API does; echo stops at it."""
    assert output_text(create(http, model="echo", input="alpha beta gamma", stop=" gamma")) == "alpha beta"
    assert output_text(create(http, model="echo", input="alpha beta gamma", stop=["beta", "x"])) == "alpha"
    too_many = error(
        http.post("/responses", json={"model": "echo", "input": "x", "stop": list("abcde")}), 400
    )
    assert (too_many["param"], too_many["code"]) == ("stop", "invalid_value")


def test_settings_a_model_cannot_honour_are_refused(http: httpx.Client) -> None:
    parameters = {"model": "echo", "input": "x", "venice_parameters": {"character_slug": "alan-watts"}}
    refused = error(http.post("/responses", json=parameters), 400)
    assert (refused["param"], refused["code"]) == ("venice_parameters", "unsupported_parameter")
    assert "'venice_parameters'" in refused["message"] and "'echo'" in refused["message"]
    # Venice options its Responses endpoint does not honour are not part of the contract at all.
    parameters["venice_parameters"] = {"disable_thinking": True}
    unknown = error(http.post("/responses", json=parameters), 400)
    assert (unknown["param"], unknown["code"]) == ("venice_parameters.disable_thinking", "unknown_parameter")
    e2ee = {"model": "echo", "input": "x", "venice_parameters": {"enable_e2ee": True}}
    assert error(http.post("/responses", json=e2ee), 400)["param"] == "venice_parameters.enable_e2ee"


def test_usage_over_http(http: httpx.Client, http_venna: HttpVenna) -> None:
    """GET /v1/usage totals the caller's workspace, as the GetUsage RPC does."""
    create(http, model="echo", input="one two three")
    create(http, model="echo", input="four five", store=False)
    deadline = time.monotonic() + 5
    while True:  # an unstored response's record is written just after its reply
        grouped = http.get("/usage", params={"group_by_model": "true"})
        assert grouped.status_code == 200, grouped.text
        usage = grouped.json()
        if usage["total"]["responses"] >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert usage["object"] == "usage"
    assert "echo" in [bucket["model"] for bucket in usage["buckets"]]
    assert usage["total"]["output_tokens"] >= 5 and isinstance(usage["total"]["output_tokens"], int)
    with client_for(http_venna, http_venna.beta) as other:
        assert other.get("/usage").json()["total"]["responses"] == 0
    bad = error(http.get("/usage", params={"start_time": "10", "end_time": "5"}), 400)
    assert bad["param"] in ("start_time", "end_time")
