"""Conformance with both published contracts of the Responses API: OpenAI's schema and Open
Responses' (``tests/openai_schema.py`` validates against both). The settings Open Responses
requires in every response (penalties, ``top_logprobs``, ``text.verbosity``), the request fields
that were refused before (penalties, ``external_web_access``), ``allowed_tools`` on echo, and the
SSE error event, which each document shapes differently.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import orjson
import pytest

from tests.http_harness import TRANSPORTS, HttpVenna, running
from tests.openai_schema import validate_response, validate_stream_event
from tests.test_http_wire import body, client_for, error, post_stream
from venna.backends import base
from venna.backends.responses import ResponsesUpstream
from venna.backends.responses.chat import chat_request
from venna.backends.responses.requests import upstream_request
from venna.backends.store import open_store
from venna.gateway_http.client import CallError
from venna.gateway_http.codec import Codec
from venna.gateway_http.sse import EventStreams
from venna.responses.v1 import response_pb2

WEATHER = {"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}}
CLOCK = {"type": "function", "name": "clock", "parameters": {"type": "object", "properties": {}}}


@pytest.fixture(scope="module", params=TRANSPORTS)
def http_venna(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpVenna]:
    yield from running(HttpVenna(tmp_path_factory.mktemp("venna") / "venna.db", transport=str(request.param)))


@pytest.fixture
def http(http_venna: HttpVenna) -> Iterator[httpx.Client]:
    with client_for(http_venna, http_venna.alpha) as client:
        yield client


def create(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    return body(http.post("/responses", json={"model": "echo", "input": "hello there", **fields}), "Response")


def test_every_response_reports_the_settings_open_responses_requires(http: httpx.Client) -> None:
    """Unset, they are reported at their defaults, never null or absent; a stored response reads
    back the same."""
    created = create(http)
    assert created["presence_penalty"] == 0.0
    assert created["frequency_penalty"] == 0.0
    assert created["top_logprobs"] == 0
    assert created["text"]["verbosity"] == "medium"
    fetched = body(http.get(f"/responses/{created['id']}"), "Response")
    assert {k: fetched[k] for k in ("presence_penalty", "frequency_penalty", "top_logprobs", "text")} == {
        k: created[k] for k in ("presence_penalty", "frequency_penalty", "top_logprobs", "text")
    }


def test_settings_given_are_echoed(http: httpx.Client) -> None:
    created = create(
        http,
        presence_penalty=0.5,
        frequency_penalty=-1.25,
        top_logprobs=3,
        text={"format": {"type": "text"}, "verbosity": "low"},
    )
    assert (created["presence_penalty"], created["frequency_penalty"]) == (0.5, -1.25)
    assert created["top_logprobs"] == 3
    assert created["text"]["verbosity"] == "low"


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [2.5, -2.01])
def test_a_penalty_out_of_range_is_400_naming_it(http: httpx.Client, name: str, value: float) -> None:
    reply = http.post("/responses", json={"model": "echo", "input": "x", name: value})
    problem = error(reply, 400)
    assert problem["param"] == name
    assert "-2 to 2" in problem["message"]


def test_a_penalty_that_is_not_a_number_is_400(http: httpx.Client) -> None:
    problem = error(
        http.post("/responses", json={"model": "echo", "input": "x", "presence_penalty": "high"}), 400
    )
    assert problem["param"] == "presence_penalty"


def test_external_web_access_is_accepted_and_echoed(http: httpx.Client) -> None:
    tool = {"type": "web_search", "external_web_access": False}
    created = create(http, tools=[tool])
    assert created["tools"] == [
        {
            "type": "web_search",
            "search_context_size": "medium",
            "user_location": None,
            "filters": None,
            "external_web_access": False,
        }
    ]
    without = create(http, tools=[{"type": "web_search"}])
    assert "external_web_access" not in without["tools"][0]


def test_allowed_tools_required_makes_echo_call_an_allowed_function(http: httpx.Client) -> None:
    """Of the tools given, only the allowed ones may be called, and "required" makes echo call
    one: the first allowed function, not the first function."""
    choice = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "clock"}]}
    created = create(http, tools=[WEATHER, CLOCK], tool_choice=choice)
    calls = [item for item in created["output"] if item["type"] == "function_call"]
    assert [call["name"] for call in calls] == ["clock"]
    assert created["tool_choice"] == choice


def test_allowed_tools_auto_leaves_echo_answering(http: httpx.Client) -> None:
    choice = {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "clock"}]}
    created = create(http, tools=[WEATHER, CLOCK], tool_choice=choice)
    assert [item["type"] for item in created["output"]] == ["message"]


def test_allowed_tools_required_with_no_allowed_function_is_400(http: httpx.Client) -> None:
    choice = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "nowhere"}]}
    reply = http.post(
        "/responses", json={"model": "echo", "input": "x", "tools": [WEATHER], "tool_choice": choice}
    )
    assert error(reply, 400)["param"] == "tool_choice.tools"


def test_every_event_of_a_stream_validates_under_both(http: httpx.Client) -> None:
    events = post_stream(http, model="echo", input="stream me", presence_penalty=1.0).events
    assert events[-1]["type"] == "response.completed"
    for event in events:
        validate_stream_event(event)  # as post_stream does already; here it is the point
    assert events[0]["response"]["usage"] is None
    assert events[-1]["response"]["presence_penalty"] == 1.0
    validate_response(events[-1]["response"])


def test_the_sse_error_event_has_both_shapes() -> None:
    """OpenAI puts the error's fields at the top of the event, Open Responses in an ``error``
    object: the event carries both, the same error in each."""
    streams = EventStreams(Codec(), keepalive_seconds=15)
    frame = streams._error_frame(CallError(grpc.StatusCode.ABORTED, "taken over"), 7)
    kind, data = frame.decode().strip().split("\n")
    assert kind == "event: error"
    event = orjson.loads(data.removeprefix("data: "))
    validate_stream_event(event)
    assert event["sequence_number"] == 7
    assert event["error"]["message"] == event["message"] == "taken over"
    assert event["error"]["code"] == event["code"]


# ------------------------------------------------------------------ penalties on upstreams


def _request(**settings: Any) -> base.GenerationRequest:
    requested = frozenset(name for name in settings if name in base.OPTIONAL_SETTINGS)
    return base.GenerationRequest(
        model="up/m",
        context=[response_pb2.Item(message=response_pb2.Message(role=response_pb2.ROLE_USER))],
        settings=base.GenerationSettings(**settings, requested=requested),
    )


def test_penalties_go_up_to_responses_and_chat_upstreams() -> None:
    request = _request(presence_penalty=0.25, frequency_penalty=-0.5)
    for body_ in (
        upstream_request(request, prefix="up/", dialect="openai"),
        chat_request(request, prefix="up/"),
    ):
        assert (body_["presence_penalty"], body_["frequency_penalty"]) == (0.25, -0.5)
    assert "presence_penalty" not in upstream_request(_request(), prefix="up/", dialect="openai")
    for dialect in ("openai", "chat"):
        ResponsesUpstream("http://127.0.0.1:9", None, prefix="up/", dialect=dialect).validate(request)


def test_venice_refuses_penalties_it_cannot_honour() -> None:
    venice = ResponsesUpstream("http://127.0.0.1:9", "key", prefix="up/", dialect="venice")
    with pytest.raises(base.BackendError) as refused:
        venice.validate(_request(frequency_penalty=1.0))
    assert refused.value.code == "unsupported_parameter"
    assert refused.value.param == "frequency_penalty"


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("tools", [{"type": "web_search"}], ("tools", 0, "type")),
        ("tools", [{"type": "web_search_preview"}], ("tools", 0, "type")),
        ("text", {"format": {"type": "json_object"}}, ("text", "format", "type")),
        ("tool_choice", {"type": "web_search_preview"}, ("tool_choice", "type")),
    ],
)
def test_a_choice_with_nothing_but_its_type_is_kept(
    http: httpx.Client, field: str, value: Any, path: tuple[str | int, ...]
) -> None:
    """``{"type": "web_search"}`` says everything by its type: it is that tool (or format, or
    choice), not an empty value refused as typeless or taken for the default."""
    fields: dict[str, Any] = {field: value}
    if field == "tool_choice":
        fields["tools"] = [{"type": "web_search_preview"}]
    created = create(http, **fields)
    reported: Any = created
    for key in path:
        reported = reported[key]
    expected: Any = value
    for key in path[1:]:
        expected = expected[key]
    assert reported == expected


def test_a_response_stored_before_the_defaults_were_reported_reads_with_them(
    http: httpx.Client, http_venna: HttpVenna
) -> None:
    """A stored response without the settings Open Responses requires (an older release stored
    it) is read back with their defaults, valid under both schemas."""

    async def store_an_old_one() -> str:
        store = open_store(http_venna.db_path)
        await store.open()
        try:
            workspace_id = await store.authenticate(http_venna.alpha)
            assert workspace_id is not None
            old = response_pb2.Response(
                id="resp_stored_long_ago",
                object="response",
                created_at=1_700_000_000,
                status=response_pb2.RESPONSE_STATUS_COMPLETED,
                model="echo",
                store=True,
                parallel_tool_calls=True,
                temperature=1.0,
                top_p=1.0,
                service_tier=response_pb2.SERVICE_TIER_AUTO,
                tool_choice=response_pb2.ToolChoice(mode=response_pb2.TOOL_CHOICE_MODE_AUTO),
                text=response_pb2.TextConfig(
                    format=response_pb2.TextFormat(text=response_pb2.TextFormatText())
                ),
                truncation=response_pb2.TRUNCATION_DISABLED,
                usage=response_pb2.Usage(
                    input_tokens=1,
                    output_tokens=1,
                    total_tokens=2,
                    input_tokens_details=response_pb2.InputTokensDetails(),
                    output_tokens_details=response_pb2.OutputTokensDetails(),
                ),
            )
            await store.create_response(workspace_id, old, [], finished=True)
            return old.id
        finally:
            await store.close()

    stored_id = asyncio.run(store_an_old_one())
    read = body(http.get(f"/responses/{stored_id}"), "Response")  # validated against both
    assert (read["text"]["verbosity"], read["top_logprobs"]) == ("medium", 0)
