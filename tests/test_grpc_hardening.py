"""The gRPC edge under hostile or careless clients: nesting and size limits that keep every
stored response readable, undecodable messages, per-key and per-process concurrency, and the
connection limits and timeouts of the gRPC server."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.conftest import Client, Venna, error_info, event_type, make_request, serving, user_message
from venna.cli import commands as cli
from venna.gateway_http.app import create_app
from venna.gateway_http.client import InProcessClient
from venna.gateway_http.server import HttpServer
from venna.responses.v1 import events_pb2, response_pb2, service_pb2
from venna.server.app import ServerConfig, VennaServer
from venna.server.auth import Context
from venna.server.validation import MAX_JSON_DEPTH, Limits

CREATE = "/venna.responses.v1.ResponsesService/CreateResponse"
STREAM = "/venna.responses.v1.ResponsesService/StreamResponse"
SLOW_MODEL = "echo:delay_ms=200"


def nested_object(depth: int) -> dict[str, Any]:
    """A JSON object nesting ``depth`` objects, the outermost included."""
    value: dict[str, Any] = {"type": "string"}
    for _ in range(depth - 1):
        value = {"properties": value}
    return value


def nested_list(depth: int) -> dict[str, Any]:
    """An object whose value nests lists: ``depth`` levels, the object included."""
    value: Any = "leaf"
    for _ in range(depth - 1):
        value = [value]
    return {"enum": value}


def deep_request(
    depth: int, *, where: str = "tools", nest: Callable[[int], dict[str, Any]] = nested_object
) -> service_pb2.CreateResponseRequest:
    request = make_request(input="hi")
    if where == "tools":
        tool = request.tools.add()
        tool.function.name = "lookup"
        tool.function.parameters.update(nest(depth))
    else:
        schema = request.text.format.json_schema
        schema.name = "answer"
        schema.schema.update(nest(depth))
    return request


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def field_violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            return [violation.field for violation in bad_request.field_violations]
    return []


# ------------------------------------------------------------------------------ enum values


async def test_enum_values_this_build_does_not_know_are_invalid_arguments(venna: Venna) -> None:
    """proto3 enums are open: a client compiled from a newer contract (or a hostile one) may
    send a number with no name. Backends take these settings by name, so it is a 400."""
    unknown_summary = make_request(input="hi")
    unknown_summary.reasoning.summary = 4  # type: ignore[assignment]
    unknown_vendor = make_request(input="hi")
    unknown_vendor.venice_parameters.enable_web_search = -1  # type: ignore[assignment]
    for request, param in (
        (unknown_summary, "reasoning.summary"),
        (unknown_vendor, "venice_parameters.enable_web_search"),
    ):
        for call in (
            venna.alpha.stub.CreateResponse(request, metadata=venna.alpha.metadata),
            venna.alpha.stub.StreamResponse(request, metadata=venna.alpha.metadata).read(),
        ):
            error = await failure(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert field_violations(error) == [param]
            assert "unknown value" in (error.details() or "")


# ------------------------------------------------------------------------------ JSON nesting


@pytest.mark.parametrize("where", ["tools", "text"])
@pytest.mark.parametrize("nest", [nested_object, nested_list], ids=["objects", "lists"])
async def test_json_nested_past_the_limit_is_refused_naming_the_field_and_the_limit(
    venna: Venna, where: str, nest: Callable[[int], dict[str, Any]]
) -> None:
    request = deep_request(MAX_JSON_DEPTH + 1, where=where, nest=nest)
    for call in (
        venna.alpha.stub.CreateResponse(request, metadata=venna.alpha.metadata),
        venna.alpha.stub.StreamResponse(request, metadata=venna.alpha.metadata).read(),
    ):
        error = await failure(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        param = "tools[0].parameters" if where == "tools" else "text.format.schema"
        assert error_info(error).metadata["param"] == param
        assert field_violations(error) == [param]
        assert error.details() == f"Invalid '{param}': nested deeper than {MAX_JSON_DEPTH} levels."
    # Nothing was stored.
    with sqlite3.connect(venna.db_path) as db:
        assert db.execute("SELECT count(*) FROM responses").fetchone() == (0,)


async def test_the_deepest_accepted_json_is_stored_and_read_back_everywhere(venna: Venna) -> None:
    request = deep_request(MAX_JSON_DEPTH)
    request.text.format.json_schema.name = "answer"
    request.text.format.json_schema.schema.update(nested_object(MAX_JSON_DEPTH))
    request.model = SLOW_MODEL
    expected_parameters = request.tools[0].function.parameters

    # In the background: the stored request, the queued body and its first events are on disk.
    background = service_pb2.CreateResponseRequest()
    background.CopyFrom(request)
    background.background = True
    del background.input[:]
    background.input.append(user_message(" ".join(["word"] * 10)))  # runs for about 2 s
    queued = await venna.alpha.stub.CreateResponse(background, metadata=venna.alpha.metadata)
    with sqlite3.connect(venna.db_path) as db:
        body, stored_request = db.execute(
            "SELECT body, request FROM responses WHERE id = ?", (queued.id,)
        ).fetchone()
        events = [row[0] for row in db.execute("SELECT body FROM events WHERE response_id = ?", (queued.id,))]
    assert response_pb2.Response.FromString(body).tools[0].function.parameters == expected_parameters
    assert service_pb2.CreateResponseRequest.FromString(stored_request).tools[0].function.parameters == (
        expected_parameters
    )
    assert events and all(events_pb2.ResponseStreamEvent.FromString(event) for event in events)
    replay = await venna.alpha.resume(queued.id)
    assert event_type(replay[-1]) == "response.completed"
    assert (
        replay[-1].completed.response.text.format.json_schema.schema == request.text.format.json_schema.schema
    )

    # Streamed in the foreground, then read back.
    request.model = "echo"
    streamed = [
        event async for event in venna.alpha.stub.StreamResponse(request, metadata=venna.alpha.metadata)
    ]
    final = streamed[-1].completed.response
    assert final.tools[0].function.parameters == expected_parameters
    stored = await venna.alpha.get(final.id)
    assert stored.status == response_pb2.RESPONSE_STATUS_COMPLETED
    assert stored.text.format.json_schema.schema == request.text.format.json_schema.schema
    # And chained: the stored response is history for the next one.
    follow_up = await venna.alpha.create(input="and then?", previous_response_id=final.id)
    assert follow_up.status == response_pb2.RESPONSE_STATUS_COMPLETED


def test_the_nesting_limit_is_safely_below_what_protobuf_can_read() -> None:
    """A stream event wrapping a response wrapping a schema is the deepest place a client's JSON
    is written to; it must still parse a few levels past the limit."""
    margin = 3
    event = events_pb2.ResponseStreamEvent()
    event.completed.response.text.format.json_schema.schema.update(nested_object(MAX_JSON_DEPTH + margin))
    event.completed.response.tools.add().function.parameters.update(nested_object(MAX_JSON_DEPTH + margin))
    parsed = events_pb2.ResponseStreamEvent.FromString(event.SerializeToString())
    assert parsed == event


async def test_over_http_nesting_and_a_huge_model_name_are_400s_naming_the_field(venna: Venna) -> None:
    headers = {"authorization": f"Bearer {venna.alpha.key}"}

    def tool(depth: int) -> dict[str, Any]:
        return {"type": "function", "name": "lookup", "parameters": nested_object(depth)}

    async with http_in_front(venna.server) as http:
        accepted = await http.post(
            "/responses",
            json={"model": "echo", "input": "hi", "tools": [tool(MAX_JSON_DEPTH)]},
            headers=headers,
        )
        assert accepted.status_code == 200, accepted.text
        stored = await http.get(f"/responses/{accepted.json()['id']}", headers=headers)
        assert stored.status_code == 200 and stored.json()["tools"][0]["parameters"] == nested_object(
            MAX_JSON_DEPTH
        )
        refused = await http.post(
            "/responses",
            json={"model": "echo", "input": "hi", "tools": [tool(MAX_JSON_DEPTH + 1)]},
            headers=headers,
        )
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", "tools[0].parameters")
        assert f"nested deeper than {MAX_JSON_DEPTH} levels" in error["message"]

        huge = await http.post(
            "/responses", json={"model": "m" * (1024 * 1024), "input": "hi"}, headers=headers
        )
        assert huge.status_code == 400
        assert huge.json()["error"]["param"] == "model"
        assert len(huge.content) < 1_000


# ------------------------------------------------------------------------------ request sizes


async def test_input_items_past_the_limit_are_refused_before_any_work(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db", limits=Limits(max_input_items=3)) as venna:
        accepted = await venna.alpha.create(input=[user_message(f"m{n}") for n in range(3)])
        assert accepted.status == response_pb2.RESPONSE_STATUS_COMPLETED
        error = await failure(venna.alpha.create(input=[user_message(f"m{n}") for n in range(4)]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(error)
        assert (info.reason, info.metadata["param"]) == ("TOO_MANY_INPUT_ITEMS", "input")
        assert "at most 3 items" in (error.details() or "")
        # The key comes first: without one, the size is nobody's business.
        anonymous = await failure(
            venna.alpha.stub.CreateResponse(make_request(input=[user_message("m")] * 4))
        )
        assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_huge_model_name_is_refused_and_never_echoed(venna: Venna) -> None:
    model = "echo:" + "x" * (1024 * 1024)
    for call in (
        venna.alpha.create(input="hi", model=model),
        venna.alpha.stub.StreamResponse(
            make_request(input="hi", model=model), metadata=venna.alpha.metadata
        ).read(),
    ):
        error = await failure(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(error).metadata["param"] == "model"
        assert "at most 256 characters" in (error.details() or "")
        assert len(error.details() or "") < 200
    # A long, unknown name under the limit is quoted only in part.
    error = await failure(venna.alpha.create(input="hi", model="z" * 256))
    assert error_info(error).reason == "MODEL_NOT_FOUND"
    assert "z" * 100 not in (error.details() or "")


async def test_client_values_in_validation_messages_are_clipped(venna: Venna) -> None:
    request = make_request(input="hi", include=["x" * 100_000])
    request.tools.add().function.name = "y" * 100_000
    error = await failure(venna.alpha.stub.CreateResponse(request, metadata=venna.alpha.metadata))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(str(rpc_status.from_call(error))) < 2_000  # type: ignore[arg-type]
    missing = await failure(venna.alpha.get("resp_" + "z" * 100_000))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert len(missing.details() or "") < 200


# ------------------------------------------------------------------------------ undecodable messages


async def test_undecodable_messages_are_invalid_argument_after_authentication(
    venna: Venna, caplog: pytest.LogCaptureFixture
) -> None:
    identity: Callable[[bytes], bytes] = lambda data: data  # noqa: E731
    create = venna.channel.unary_unary(CREATE, request_serializer=identity, response_deserializer=identity)
    stream = venna.channel.unary_stream(STREAM, request_serializer=identity, response_deserializer=identity)
    # A truncated field, and a message nested past protobuf's 100 levels.
    truncated = b"\x0a\x05ab"
    too_deep = deep_request(40).SerializeToString()
    caplog.set_level(logging.DEBUG)
    for garbage in (truncated, too_deep):
        anonymous = await failure(create(garbage))
        assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED
        for call in (
            create(garbage, metadata=venna.alpha.metadata),
            stream(garbage, metadata=venna.alpha.metadata).read(),
        ):
            error = await failure(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(error).reason == "UNDECODABLE_REQUEST"
            assert (error.details() or "").startswith("The request message could not be decoded")
            assert "Error" not in (error.details() or "")  # no exception class names
    # Health and reflection need no key, and refuse such messages the same way.
    check = venna.channel.unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=identity, response_deserializer=identity
    )
    reflect = venna.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=identity,
        response_deserializer=identity,
    )
    for call in (check(truncated), reflect(iter([truncated])).read()):
        error = await failure(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(error).reason == "UNDECODABLE_REQUEST"
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING or record.exc_info]
    # The connection and the server are fine afterwards.
    assert (await venna.alpha.create(input="hi")).status == response_pb2.RESPONSE_STATUS_COMPLETED


# ------------------------------------------------------------------------------ Authenticator.verify


class RecordingContext:
    """The two methods of a servicer context that ``verify`` uses; abort raises, as grpc's does."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata
        self.aborted: tuple[grpc.StatusCode, str, Any] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        self.aborted = (code, details, trailing_metadata)
        raise RuntimeError("aborted")


async def test_verify_accepts_a_valid_key_and_aborts_otherwise(venna: Venna) -> None:
    verify = venna.server.authenticator.verify
    valid = RecordingContext((("authorization", f"Bearer {venna.alpha.key}"),))
    await verify(_as_context(valid))
    assert valid.aborted is None
    for metadata, reason in (
        ((), "MISSING_API_KEY"),
        ((("authorization", "Bearer vk_nope"),), "INVALID_API_KEY"),
    ):
        refused = RecordingContext(metadata)
        with pytest.raises(RuntimeError, match="aborted"):
            await verify(_as_context(refused))
        assert refused.aborted is not None
        code, details, trailing = refused.aborted
        assert code == grpc.StatusCode.UNAUTHENTICATED and "API key" in details
        assert any(key == "grpc-status-details-bin" and reason.encode() in value for key, value in trailing)


async def test_a_call_with_two_authorization_entries_is_refused(venna: Venna) -> None:
    for metadata in (
        (("authorization", f"Bearer {venna.alpha.key}"), ("authorization", "Bearer vk_other")),
        (("authorization", "Bearer vk_other"), ("authorization", f"Bearer {venna.alpha.key}")),
    ):
        error = await failure(venna.alpha.stub.CreateResponse(make_request(input="hi"), metadata=metadata))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(error).reason == "INVALID_API_KEY"


def _as_context(context: RecordingContext) -> Context:
    return context  # type: ignore[return-value]  # the part of a servicer context verify uses


# ------------------------------------------------------------------------------ concurrency


async def _started(client: Client, model: str = SLOW_MODEL) -> grpc.aio.UnaryStreamCall[Any, Any]:
    """A slow stream of ``client`` that has begun answering."""
    call = client.stub.StreamResponse(
        make_request(input="one two three four five six", model=model), metadata=client.metadata
    )
    await call.read()
    return call


async def test_a_key_runs_at_most_its_limit_of_calls_at_once(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db", max_concurrent_per_key=2) as venna:
        running = [await _started(venna.alpha), await _started(venna.alpha)]
        assert venna.server.authenticator.running(venna.alpha.key) == 2
        for call in (venna.alpha.create(input="hi"), _started(venna.alpha)):
            error = await failure(call)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(error).reason == "TOO_MANY_CONCURRENT_REQUESTS"
            assert "at most 2" in (error.details() or "")
        # Another key is not held back by this one.
        assert (await venna.beta.create(input="hi")).status == response_pb2.RESPONSE_STATUS_COMPLETED
        # Ending a call frees its place.
        running[0].cancel()
        deadline = time.monotonic() + 5
        while venna.server.authenticator.running(venna.alpha.key) > 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert (await venna.alpha.create(input="hi")).status == response_pb2.RESPONSE_STATUS_COMPLETED
        running[1].cancel()


@asynccontextmanager
async def http_in_front(server: VennaServer) -> AsyncIterator[httpx.AsyncClient]:
    """The HTTP shim over ``server``'s handlers, as `venna serve` composes it."""
    http = HttpServer(
        create_app(InProcessClient(server.handler, check_key=server.authenticator.verify)), "127.0.0.1:0", 1.0
    )
    await http.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http.port}/v1", timeout=10) as client:
            yield client
    finally:
        await http.stop()


async def test_over_http_a_key_past_its_limit_gets_429(tmp_path: Path) -> None:
    async with (
        serving(tmp_path / "venna.db", max_concurrent_per_key=1) as venna,
        http_in_front(venna.server) as http,
    ):
        held = await _started(venna.alpha)
        answer = await http.post(
            "/responses",
            json={"model": "echo", "input": "hi"},
            headers={"authorization": f"Bearer {venna.alpha.key}"},
        )
        assert answer.status_code == 429
        error = answer.json()["error"]
        assert error["type"] == "rate_limit_error" and "at most 1" in error["message"]
        held.cancel()


async def test_the_process_runs_at_most_its_limit_of_grpc_calls(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db", max_concurrent_rpcs=2) as venna:
        held = [await _started(venna.alpha), await _started(venna.beta)]
        error = await failure(venna.alpha.create(input="hi"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in held:
            call.cancel()


# ------------------------------------------------------------------------------ connections


async def _wait_for_state(channel: grpc.aio.Channel, wanted: grpc.ChannelConnectivity, within: float) -> None:
    deadline = time.monotonic() + within
    while (state := channel.get_state()) != wanted:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"channel still {state}"
        with suppress(TimeoutError):
            await asyncio.wait_for(channel.wait_for_state_change(state), remaining)


async def test_an_idle_connection_is_closed(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db", max_connection_idle=0.3) as venna:
        assert (await venna.alpha.create(input="hi")).status == response_pb2.RESPONSE_STATUS_COMPLETED
        assert venna.channel.get_state() == grpc.ChannelConnectivity.READY
        await _wait_for_state(venna.channel, grpc.ChannelConnectivity.IDLE, within=3)
        # The client simply reconnects.
        assert (await venna.alpha.create(input="hi")).status == response_pb2.RESPONSE_STATUS_COMPLETED


async def test_an_old_connection_is_closed_after_its_grace(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db", max_connection_age=0.3, max_connection_age_grace=0.3) as venna:
        started = time.monotonic()
        call = venna.alpha.stub.StreamResponse(
            make_request(input=" ".join(["word"] * 50), model="echo:delay_ms=100"),
            metadata=venna.alpha.metadata,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 3  # not the 5 s the stream needed


async def _raw_connection(venna: Venna) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = venna.server.address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def test_a_connection_that_never_handshakes_is_closed(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db", handshake_timeout=0.3) as venna:
        reader, writer = await _raw_connection(venna)
        started = time.monotonic()
        said = await asyncio.wait_for(reader.read(), 5)  # until the server closes the connection
        assert time.monotonic() - started < 3
        assert b"handshake timeout" in said  # in its GOAWAY
        writer.close()
        await writer.wait_closed()


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING = 0x4, 0x6
MAX_CONCURRENT_STREAMS = 0x3


def _frame(kind: int, flags: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", 0) + payload


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, int]:
    header = await reader.readexactly(9)
    length = int.from_bytes(header[:3], "big")
    await reader.readexactly(length)
    return header[3], header[4]


async def test_a_peer_that_does_not_answer_pings_is_dropped(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db", keepalive_time=0.3, keepalive_timeout=0.3) as venna:
        reader, writer = await _raw_connection(venna)
        writer.write(PREFACE + _frame(SETTINGS))
        started = time.monotonic()
        kinds = []
        try:
            while True:
                kind, flags = await asyncio.wait_for(_read_frame(reader), 5)
                kinds.append(kind)
                if kind == SETTINGS and not flags:
                    writer.write(_frame(SETTINGS, flags=1))  # acknowledged; pings are not
        except asyncio.IncompleteReadError:
            pass
        assert PING in kinds
        assert time.monotonic() - started < 3
        writer.close()
        await writer.wait_closed()


async def test_the_per_connection_stream_limit_is_announced(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db", max_streams_per_connection=5) as venna:
        reader, writer = await _raw_connection(venna)
        writer.write(PREFACE + _frame(SETTINGS))
        header = await asyncio.wait_for(reader.readexactly(9), 5)
        assert header[3] == SETTINGS
        payload = await reader.readexactly(int.from_bytes(header[:3], "big"))
        settings = dict(struct.unpack(">HI", payload[at : at + 6]) for at in range(0, len(payload), 6))
        assert settings[MAX_CONCURRENT_STREAMS] == 5
        writer.close()
        await writer.wait_closed()


async def test_connections_past_the_limit_are_refused(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db", max_connections=2) as venna:
        extra = [
            grpc.aio.insecure_channel(venna.server.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(2)
        ]
        try:
            # The fixture's channel and one more fill the limit.
            assert (await venna.alpha.create(input="hi")).status == response_pb2.RESPONSE_STATUS_COMPLETED
            second = Client(venna.alpha.stub.__class__(extra[0]), venna.alpha.key)
            assert (await second.create(input="hi")).status == response_pb2.RESPONSE_STATUS_COMPLETED
            third = Client(venna.alpha.stub.__class__(extra[1]), venna.alpha.key)
            error = await failure(
                third.stub.CreateResponse(make_request(input="hi"), metadata=third.metadata, timeout=2)
            )
            assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        finally:
            for channel in extra:
                await channel.close(grace=None)


async def test_the_receive_limit_follows_max_request_bytes(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db", max_request_bytes=64 * 1024) as venna:
        error = await failure(venna.alpha.create(input="x" * 100_000))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await venna.alpha.create(input="x" * 10_000)).status == response_pb2.RESPONSE_STATUS_COMPLETED


# ------------------------------------------------------------------------------ flags


def test_serve_flags_and_environment_set_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VENNA_GRPC_MAX_CONNECTIONS", "7")
    monkeypatch.setenv("VENNA_MAX_INPUT_ITEMS", "11")
    options = cli._build_parser().parse_args(
        [
            "serve",
            "--max-request-bytes",
            "1000",
            "--max-concurrent-per-key",
            "3",
            "--grpc-keepalive-time",
            "1.5",
        ]
    )
    config = ServerConfig(**cli._limit_settings(options))  # type: ignore[arg-type]
    assert config.max_request_bytes == 1000
    assert config.max_concurrent_per_key == 3
    assert config.keepalive_time == 1.5
    assert config.max_connections == 7
    assert config.limits == Limits(max_input_items=11)
    assert ("grpc.max_receive_message_length", 1000) in config.grpc_options()


def test_a_limit_that_is_not_positive_stops_serve_with_a_message(tmp_path: Path) -> None:
    for flag, value, message in (
        ("--max-input-items", "0", "venna: request limits must be at least 1"),
        ("--grpc-keepalive-time", "-1", "venna: keepalive_time must be positive"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "venna.cli", "serve", flag, value, "--db", str(tmp_path / "venna.db")],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 2
        assert message in done.stderr and "Traceback" not in done.stderr
