"""WebSocket mode of ``/v1/responses``: real WebSocket connections through uvicorn, with the
``websockets`` client and the official SDK's ``responses.connect()``. Turns run one after another
on one connection, stream the same events as SSE (each valid under both schemas), continue
through ``previous_response_id`` (an unstored response too, within its connection), and fail as
``error`` messages that leave the connection open.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.http_harness import TRANSPORTS, HttpVenna, running
from tests.openai_schema import validate_open_responses, validate_stream_event
from tests.test_http_wire import client_for, post_stream
from venna.gateway_http.server import ConnectionLimits

TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


@pytest.fixture(scope="module", params=TRANSPORTS)
def http_venna(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpVenna]:
    yield from running(HttpVenna(tmp_path_factory.mktemp("venna") / "venna.db", transport=str(request.param)))


def ws_url(venna: HttpVenna) -> str:
    return venna.base_url.replace("http://", "ws://") + "/responses"


def open_socket(venna: HttpVenna, key: str | None = None) -> ClientConnection:
    return connect(
        ws_url(venna), additional_headers={"Authorization": f"Bearer {key or venna.alpha}"}, open_timeout=10
    )


def turn(socket: ClientConnection, **body: Any) -> list[dict[str, Any]]:
    """Sends one response.create and reads its events up to the terminal one (or an error)."""
    socket.send(json.dumps({"type": "response.create", **body}))
    events: list[dict[str, Any]] = []
    while True:
        event = json.loads(socket.recv(timeout=10))
        events.append(event)
        if event["type"] in TERMINAL or event["type"] == "error":
            return events


def test_a_turn_streams_the_same_events_as_sse(http_venna: HttpVenna) -> None:
    with open_socket(http_venna) as socket:
        events = turn(socket, model="echo", input="the same events")
    with client_for(http_venna, http_venna.alpha) as http:
        over_sse = post_stream(http, model="echo", input="the same events").events
    assert [event["type"] for event in events] == [event["type"] for event in over_sse]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    for event in events:
        validate_stream_event(event)
    final = events[-1]["response"]
    assert final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == "the same events"


def test_turns_run_one_after_another_and_continue_a_stored_response(http_venna: HttpVenna) -> None:
    with open_socket(http_venna) as socket:
        first = turn(socket, model="echo", input="first turn")[-1]["response"]
        second = turn(socket, model="echo", input="second turn", previous_response_id=first["id"])[-1][
            "response"
        ]
    assert second["previous_response_id"] == first["id"]
    assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"]
    stored = httpx.get(
        f"{http_venna.base_url}/responses/{second['id']}",
        headers={"authorization": f"Bearer {http_venna.alpha}"},
    )
    assert stored.json()["previous_response_id"] == first["id"]


def test_an_unstored_response_is_continued_within_its_connection(http_venna: HttpVenna) -> None:
    """With ``store: false`` nothing is stored, yet the next turn on the same connection
    continues it: the model sees the whole conversation (echo counts it in its usage)."""
    with open_socket(http_venna) as socket:
        first = turn(socket, model="echo", input="one two three", store=False)[-1]["response"]
        second_events = turn(
            socket, model="echo", input="four", store=False, previous_response_id=first["id"]
        )
        third = turn(
            socket,
            model="echo",
            input="five",
            store=False,
            previous_response_id=second_events[-1]["response"]["id"],
        )
    second = second_events[-1]["response"]
    assert second["status"] == "completed", second_events
    assert second["previous_response_id"] == first["id"]
    # first input (3) + first output (3) + new input (1)
    assert second["usage"]["input_tokens"] == 7
    assert third[-1]["response"]["usage"]["input_tokens"] == 7 + 1 + 1
    for event in second_events:
        validate_stream_event(event)
    not_stored = httpx.get(
        f"{http_venna.base_url}/responses/{first['id']}",
        headers={"authorization": f"Bearer {http_venna.alpha}"},
    )
    assert not_stored.status_code == 404


def test_only_the_most_recent_unstored_response_is_remembered(http_venna: HttpVenna) -> None:
    with open_socket(http_venna) as socket:
        first = turn(socket, model="echo", input="one", store=False)[-1]["response"]
        turn(socket, model="echo", input="two", store=False)
        older = turn(socket, model="echo", input="three", previous_response_id=first["id"])
    assert older[-1]["type"] == "error"
    assert older[-1]["status"] == 400
    assert older[-1]["error"]["code"] == "previous_response_not_found"


def test_an_unstored_response_is_not_continued_on_another_connection(http_venna: HttpVenna) -> None:
    with open_socket(http_venna) as socket:
        first = turn(socket, model="echo", input="one", store=False)[-1]["response"]
    with open_socket(http_venna) as other:
        refused = turn(other, model="echo", input="two", previous_response_id=first["id"])
    assert refused[-1]["error"]["code"] == "previous_response_not_found"


@pytest.mark.parametrize(
    ("message", "param", "code"),
    [
        (
            {"type": "response.create", "model": "echo", "input": "x", "stream": True},
            "stream",
            "unsupported_parameter",
        ),
        (
            {"type": "response.create", "model": "echo", "input": "x", "background": True},
            "background",
            "unsupported_parameter",
        ),
        ({"type": "response.cancel"}, "type", "invalid_value"),
        ({"model": "echo", "input": "x"}, "type", "missing_required_parameter"),
        (
            {"type": "response.create", "model": "echo", "input": "x", "temperature": 9},
            "temperature",
            "invalid_value",
        ),
        ({"type": "response.create", "model": "nope", "input": "x"}, "model", "model_not_found"),
        (
            {"type": "response.create", "model": "echo", "input": "x", "bogus": 1},
            "bogus",
            "unknown_parameter",
        ),
    ],
)
def test_a_bad_turn_is_an_error_message_and_the_connection_stays_open(
    http_venna: HttpVenna, message: dict[str, Any], param: str, code: str
) -> None:
    with open_socket(http_venna) as socket:
        socket.send(json.dumps(message))
        error = json.loads(socket.recv(timeout=10))
        assert error["type"] == "error"
        assert error["status"] == 400
        assert (error["error"]["param"], error["error"]["code"]) == (param, code)
        validate_open_responses(error, "WebSocketErrorEvent")
        after = turn(socket, model="echo", input="still here")
    assert after[-1]["type"] == "response.completed"


def test_a_message_that_is_not_json_is_an_error(http_venna: HttpVenna) -> None:
    with open_socket(http_venna) as socket:
        socket.send("{not json")
        error = json.loads(socket.recv(timeout=10))
        assert (error["type"], error["status"], error["error"]["code"]) == ("error", 400, "invalid_json")
        assert turn(socket, model="echo", input="ok")[-1]["type"] == "response.completed"


def test_a_failure_mid_stream_ends_with_response_failed(http_venna: HttpVenna) -> None:
    with open_socket(http_venna) as socket:
        events = turn(socket, model="echo:fail_after=2", input="one two three four")
        assert events[-1]["type"] == "response.failed"
        assert turn(socket, model="echo", input="next")[-1]["type"] == "response.completed"


@pytest.mark.parametrize(("key", "code"), [(None, "missing_api_key"), ("vk_wrong", "invalid_api_key")])
def test_the_handshake_needs_a_valid_key(http_venna: HttpVenna, key: str | None, code: str) -> None:
    """Refused before the upgrade, with OpenAI's error JSON and 401, as an HTTP call would be."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(http_venna), additional_headers=headers, open_timeout=10)
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body or b"{}")["error"]["code"] == code


def test_another_workspace_cannot_continue_a_response(http_venna: HttpVenna) -> None:
    with open_socket(http_venna) as socket:
        mine = turn(socket, model="echo", input="mine")[-1]["response"]
    with open_socket(http_venna, http_venna.beta) as theirs:
        refused = turn(theirs, model="echo", input="x", previous_response_id=mine["id"])
    assert refused[-1]["error"]["code"] == "previous_response_not_found"


def test_a_client_leaving_mid_turn_cancels_it(http_venna: HttpVenna) -> None:
    """Leaving stops the work, as an HTTP client leaving does: the response is stored cancelled,
    not left in progress."""
    with open_socket(http_venna) as socket:
        socket.send(
            json.dumps(
                {"type": "response.create", "model": "echo:delay_ms=100", "input": " ".join(["w"] * 60)}
            )
        )
        created = json.loads(socket.recv(timeout=10))
        assert created["type"] == "response.created"
    deadline = time.monotonic() + 5
    status = None
    while time.monotonic() < deadline:
        status = httpx.get(
            f"{http_venna.base_url}/responses/{created['response']['id']}",
            headers={"authorization": f"Bearer {http_venna.alpha}"},
        ).json()["status"]
        if status != "in_progress":
            break
        time.sleep(0.05)
    assert status == "cancelled"


def test_the_official_sdk_connects(http_venna: HttpVenna) -> None:
    client = openai.OpenAI(base_url=http_venna.base_url, api_key=http_venna.alpha, max_retries=0)
    with client.responses.connect() as connection:
        connection.response.create(model="echo", input="through the sdk")
        kinds: list[str] = []
        text = ""
        for event in connection:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
            if event.type == "response.completed":
                break
    client.close()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert text == "through the sdk"


def test_a_connection_ends_at_its_time_limit_after_its_turn(tmp_path: Path) -> None:
    """As OpenAI's: a connection lasts a bounded time; a turn under way when it is reached
    finishes first, then the client is told why and the connection closes."""
    venna = HttpVenna(tmp_path / "venna.db", websocket_max_seconds=1.0)
    venna.start()
    try:
        with open_socket(venna) as socket:
            # Echo words every 100 ms: this turn outlasts the connection's second.
            events = turn(socket, model="echo:delay_ms=100", input=" ".join(["word"] * 15))
            assert events[-1]["type"] == "response.completed"
            expired = json.loads(socket.recv(timeout=10))
            assert expired["type"] == "error"
            assert expired["error"]["code"] == "websocket_connection_limit_reached"
            with pytest.raises(ConnectionClosedOK):
                socket.recv(timeout=10)
        with open_socket(venna) as fresh:  # a new connection works at once
            assert turn(fresh, model="echo", input="again")[-1]["type"] == "response.completed"
    finally:
        venna.stop()


def test_websocket_connections_count_against_the_connection_cap(tmp_path: Path) -> None:
    venna = HttpVenna(tmp_path / "venna.db", limits=ConnectionLimits(max_connections=2))
    venna.start()
    try:
        with open_socket(venna) as first, open_socket(venna) as second:
            for socket in (first, second):  # both upgraded and serving
                assert turn(socket, model="echo", input="held")[-1]["type"] == "response.completed"
            refused = httpx.get(
                f"{venna.base_url}/models", headers={"authorization": f"Bearer {venna.alpha}"}
            )
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "too_many_connections"
        time.sleep(0.2)  # the server notices the closes
        assert (
            httpx.get(
                f"{venna.base_url}/models", headers={"authorization": f"Bearer {venna.alpha}"}
            ).status_code
            == 200
        )
    finally:
        venna.stop()
