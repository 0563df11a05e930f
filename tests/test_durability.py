"""What is stored stays usable and what a client saw end is stored: rows that cannot be read
back fail alone (never the server's start), terminal events follow durable final states,
per-workspace caps, and private data files."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from google.protobuf import struct_pb2

from tests.conftest import Venna, error_info, event_type, make_request, output_text, serving, start_config
from tests.http_harness import HttpVenna
from tests.test_background import wait_for_status
from venna.backends.store import UNREADABLE_MESSAGE, Lease
from venna.backends.store.records import new_response_rows
from venna.backends.store.sqlite import SqliteStore
from venna.backends.store.sqlite.queries import Store
from venna.responses.v1 import events_pb2, response_pb2, service_pb2, service_pb2_grpc
from venna.server.app import VennaServer
from venna.server.builder import ResponseBuilder
from venna.server.ids import new_id

SLOW = "echo:delay_ms=40"
TEN_WORDS = "one two three four five six seven eight nine ten"
TERMINAL_TYPES = {"response.completed", "response.incomplete", "response.failed"}
GARBAGE = b"\xff\xff\xff not a protobuf message"


# ---------------------------------------------------------------------------- helpers


def nested_struct(levels: int) -> struct_pb2.Struct:
    """A Struct nested ``levels`` deep: protobuf serializes it, but cannot parse it back."""
    root = struct_pb2.Struct()
    inner = root
    for _ in range(levels):
        inner = inner.fields["a"].struct_value
    return root


def deep_tool(target: Any) -> None:
    """Adds a function tool whose parameters are nested 60 levels to ``target.tools``."""
    tool = target.tools.add()
    tool.function.name = "deep"
    tool.function.parameters.CopyFrom(nested_struct(60))


def stored_status(db_path: Path, response_id: str) -> int:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        row = db.execute("SELECT status FROM responses WHERE id = ?", [response_id]).fetchone()
    assert row is not None
    return int(row[0])


def stored_event_types(db_path: Path, response_id: str) -> list[str]:
    """The types of a response's stored events, in order (read with a connection of its own)."""
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        rows = db.execute(
            "SELECT sequence_number, body FROM events WHERE response_id = ? ORDER BY sequence_number",
            [response_id],
        ).fetchall()
    assert [number for number, _ in rows] == list(range(len(rows)))
    return [event_type(events_pb2.ResponseStreamEvent.FromString(body)) for _, body in rows]


def assert_one_terminal_event_last(types: list[str], expected: str | None) -> None:
    terminals = [kind for kind in types if kind in TERMINAL_TYPES]
    if expected is None:
        assert terminals == []
    else:
        assert terminals == [expected]
        assert types[-1] == expected


async def workspace_of(venna: Venna, key: str) -> str:
    workspace_id = await venna.server.store.authenticate(key)
    assert workspace_id is not None
    return workspace_id


def slow_final_writes(server: VennaServer, seconds: float) -> list[tuple[str, float]]:
    """Makes the store's final write of every response take ``seconds`` longer, on the store's
    own thread; returns a log of (response id, commit time) filled in as they complete."""
    assert isinstance(server.store, SqliteStore)
    store = server.store.queries
    real = store.save_response
    committed: list[tuple[str, float]] = []

    def save_response(workspace_id: str, response: response_pb2.Response, **kwargs: Any) -> bool:
        if not kwargs.get("finished"):
            return real(workspace_id, response, **kwargs)
        time.sleep(seconds)
        saved = real(workspace_id, response, **kwargs)
        committed.append((response.id, time.monotonic()))
        return saved

    store.save_response = save_response  # type: ignore[method-assign]
    return committed


# ---------------------------------------------------------------------------- poison rows


def lifecycle_event(
    sequence_number: int, kind: str, response: response_pb2.Response
) -> events_pb2.ResponseStreamEvent:
    """A lifecycle event with a snapshot of ``response``, copied in (which, unlike a message
    constructor, does not parse what it copies)."""
    event = events_pb2.ResponseStreamEvent(sequence_number=sequence_number)
    getattr(event, kind).response.CopyFrom(response)
    return event


def test_lifecycle_events_carry_a_snapshot_too_deep_to_parse() -> None:
    """Lifecycle events copy the response in: building them never parses it, so a response
    that protobuf can write but not read (one the edge refuses today, or one read from an
    older database) still gets its events instead of failing its call."""
    response = response_pb2.Response(id=new_id("resp"), object="response", model="echo")
    deep_tool(response)
    response.status = response_pb2.RESPONSE_STATUS_IN_PROGRESS
    builder = ResponseBuilder(response)
    events = builder.created() + builder.completed()
    assert [event_type(event) for event in events] == ["response.created", "response.completed"]
    assert events[-1].completed.response.tools[0] == response.tools[0]


def queued_rows(
    workspace_id: str, response: response_pb2.Response, request: service_pb2.CreateResponseRequest
) -> Any:
    """The rows a background create stores: the queued response, its request, its first events."""
    response.status = response_pb2.RESPONSE_STATUS_QUEUED
    response.background = True
    events = [lifecycle_event(0, "created", response), lifecycle_event(1, "queued", response)]
    return new_response_rows(workspace_id, response, list(request.input), request=request, events=events)


def plant_poison_rows(db_path: Path, workspace_id: str) -> dict[str, str]:
    """Stores responses that cannot be read back, as an older version or a damaged file left
    them, beside one that can; returns their ids by name."""
    ids = {name: new_id("resp") for name in ("garbage", "deep", "pending_garbage", "pending_deep", "queued")}
    now = int(time.time())
    store = Store(db_path)
    try:
        # Finished, with tool parameters nested beyond the parser's limit: stored through the
        # store's own insert path, as a create without edge validation stored it.
        deep = response_pb2.Response(
            id=ids["deep"], object="response", model="echo", created_at=now, background=True
        )
        deep_tool(deep)
        deep.status = response_pb2.RESPONSE_STATUS_COMPLETED
        events = [lifecycle_event(0, "created", deep), lifecycle_event(1, "completed", deep)]
        store.insert(
            new_response_rows(
                workspace_id, deep, list(make_request(input="hi").input), events=events, finished=True
            )
        )
        # Queued with such a body and request: its run would need both.
        request = make_request(input="deep", background=True)
        deep_tool(request)
        pending = response_pb2.Response(
            id=ids["pending_deep"], object="response", model="echo", created_at=now
        )
        deep_tool(pending)
        store.insert(queued_rows(workspace_id, pending, request))
        # An ordinary queued response, to be run again after the restart like any other.
        request = make_request(input=TEN_WORDS, background=True)
        queued = response_pb2.Response(id=ids["queued"], object="response", model="echo", created_at=now)
        store.insert(queued_rows(workspace_id, queued, request))
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(db_path)) as db, db:
        insert = (
            "INSERT INTO responses (id, workspace_id, status, background, created_at, body, request)"
            " VALUES (?, ?, ?, 1, ?, ?, ?)"
        )
        db.execute(
            insert, [ids["garbage"], workspace_id, response_pb2.RESPONSE_STATUS_COMPLETED, now, GARBAGE, None]
        )
        db.execute(
            "INSERT INTO items (workspace_id, response_id, item_id, kind, position, body)"
            " VALUES (?, ?, ?, 0, 0, ?)",
            [workspace_id, ids["garbage"], "msg_garbage", GARBAGE],
        )
        pending_status = response_pb2.RESPONSE_STATUS_IN_PROGRESS
        db.execute(insert, [ids["pending_garbage"], workspace_id, pending_status, now, GARBAGE, GARBAGE])
        for response_id in (ids["garbage"], ids["pending_garbage"]):
            db.execute(
                "INSERT INTO events (response_id, sequence_number, body) VALUES (?, 0, ?)",
                [response_id, GARBAGE],
            )
    return ids


async def assert_reads_as_failed(venna: Venna, response_id: str, *, chained: bool = False) -> None:
    """GET answers a failed response and replay one terminal event; chaining a clear 400-class
    error, unless recovery settled the row in place (``chained``): then it is an ordinary
    failed response, and a conversation may go on from it."""
    response = await venna.alpha.get(response_id)
    assert response.id == response_id
    assert response.created_at > 0
    assert response.status == response_pb2.RESPONSE_STATUS_FAILED
    assert response.error.code == "server_error"
    assert response.error.message == UNREADABLE_MESSAGE

    replay = await venna.alpha.resume(response_id)
    assert [event_type(event) for event in replay] == ["response.failed"]
    assert replay[-1].failed.response.id == response_id

    if chained:
        follow_up = await venna.alpha.create(input="go on", previous_response_id=response_id)
        assert follow_up.status == response_pb2.RESPONSE_STATUS_COMPLETED
        return
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await venna.alpha.create(input="go on", previous_response_id=response_id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert info.reason == "PREVIOUS_RESPONSE_UNREADABLE"
    assert info.metadata["param"] == "previous_response_id"
    assert response_id in (caught.value.details() or "")


async def test_unreadable_rows_fail_alone_and_never_stop_a_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db_path = tmp_path / "venna.db"
    async with serving(db_path) as venna:
        workspace_id = await workspace_of(venna, venna.alpha.key)
        readable = await venna.alpha.create(input="still fine")
        queued = await venna.alpha.create(input=TEN_WORDS, background=True)
        streamed = await wait_for_status(venna, queued.id, response_pb2.RESPONSE_STATUS_COMPLETED)
        whole = [event_type(event) for event in await venna.alpha.resume(streamed.id)]
    ids = plant_poison_rows(db_path, workspace_id)
    with contextlib.closing(sqlite3.connect(db_path)) as db, db:  # one event in the middle is damaged
        db.execute(
            "UPDATE events SET body = ? WHERE response_id = ? AND sequence_number = 5", [GARBAGE, streamed.id]
        )

    caplog.set_level(logging.WARNING, logger="venna.server.runner")
    async with serving(db_path) as venna:  # the same workspace gets a new key
        for name in ("garbage", "deep"):
            await assert_reads_as_failed(venna, ids[name])
        for name in ("pending_garbage", "pending_deep"):
            await assert_reads_as_failed(venna, ids[name], chained=True)
        # Recovery settled the unfinished ones in place, each with one warning and no traceback.
        for name in ("pending_garbage", "pending_deep"):
            assert stored_status(db_path, ids[name]) == response_pb2.RESPONSE_STATUS_FAILED
            [warning] = [
                record
                for record in caplog.records
                if record.name == "venna.server.runner" and ids[name] in record.getMessage()
            ]
            assert warning.levelno == logging.WARNING and warning.exc_info is None

        # Other rows are untouched: the queued one ran, the readable one reads and chains.
        done = await wait_for_status(venna, ids["queued"], response_pb2.RESPONSE_STATUS_COMPLETED)
        assert output_text(done) == TEN_WORDS
        assert await venna.alpha.get(readable.id) == readable
        # A damaged event ends the replay there, with the end the stored response has.
        replay = await venna.alpha.resume(streamed.id)
        assert [event_type(event) for event in replay] == [*whole[:5], "response.completed"]
        assert [event.sequence_number for event in replay] == list(range(6))
        assert replay[-1].completed.response == await venna.alpha.get(streamed.id) == streamed
        follow_up = await venna.alpha.create(input="next", previous_response_id=readable.id)
        assert follow_up.status == response_pb2.RESPONSE_STATUS_COMPLETED

        # Input items that cannot be read: a clear error naming what, not an internal one.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await venna.alpha.input_items(ids["garbage"])
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(caught.value).reason == "STORED_RESPONSE_UNREADABLE"
        reference = response_pb2.Item()
        reference.item_reference.id = "msg_garbage"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await venna.alpha.create(input=[reference])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).metadata["param"] == "input[0].id"
        # Another workspace still cannot see them at all.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await venna.beta.get(ids["garbage"])
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_unreadable_rows_over_http(tmp_path: Path) -> None:
    """Over HTTP: a GET answers 200 with a failed response, chaining 400 naming the parameter."""
    db_path = tmp_path / "venna.db"
    store = Store(db_path)
    try:
        store.create_key("alpha")
        workspace_id = store.list_workspaces()[0].id
    finally:
        store.close()
    ids = plant_poison_rows(db_path, workspace_id)
    venna = HttpVenna(db_path)
    venna.start()
    try:
        headers = {"Authorization": f"Bearer {venna.alpha}"}
        with httpx.Client(base_url=venna.base_url, headers=headers, timeout=10) as http:
            got = http.get(f"/responses/{ids['deep']}")
            assert got.status_code == 200
            assert got.json()["status"] == "failed"
            assert got.json()["error"]["code"] == "server_error"
            chained = http.post(
                "/responses", json={"model": "echo", "input": "x", "previous_response_id": ids["garbage"]}
            )
            assert chained.status_code == 400
            error = chained.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["param"] == "previous_response_id"
            assert error["code"] == "previous_response_unreadable"
            replay = http.get(f"/responses/{ids['pending_garbage']}", params={"stream": "true"})
            assert replay.status_code == 200
            assert replay.text.count("event: response.failed") == 1
    finally:
        venna.stop()


async def test_a_database_from_before_usage_records_migrates_past_unreadable_rows(tmp_path: Path) -> None:
    """The migration that fills in usage records from stored responses reads every finished
    one: a body it cannot decode gets a record without tokens instead of stopping the start."""
    db_path = tmp_path / "venna.db"
    store = Store(db_path)
    try:
        store.create_key("alpha")
        workspace_id = store.list_workspaces()[0].id
    finally:
        store.close()
    ids = plant_poison_rows(db_path, workspace_id)
    with contextlib.closing(sqlite3.connect(db_path)) as db, db:  # as it was before usage records
        db.execute("DROP TABLE usage")
        db.execute("DROP INDEX idx_responses_unfinished")
        db.execute("DELETE FROM _sqlite_migrations WHERE name IN ('m002_usage', 'm003_fewer_index_writes')")
    async with serving(db_path) as venna:
        await assert_reads_as_failed(venna, ids["garbage"])
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        usage = dict(db.execute("SELECT response_id, status FROM usage").fetchall())
    assert usage[ids["garbage"]] == "completed"
    assert usage[ids["deep"]] == "completed"


# ---------------------------------------------------------------------------- durability order


async def test_a_streamed_end_reaches_the_client_only_once_stored(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db") as venna:
        committed = slow_final_writes(venna.server, 0.4)
        call = venna.alpha.stub.StreamResponse(make_request(input=TEN_WORDS), metadata=venna.alpha.metadata)
        async for event in call:
            if event_type(event) == "response.completed":
                seen = time.monotonic()
                response_id = event.completed.response.id
                # Read at once, with a connection of its own, before the client reads on.
                assert stored_status(venna.db_path, response_id) == response_pb2.RESPONSE_STATUS_COMPLETED
                assert [done for done, _ in committed] == [response_id]
                assert committed[0][1] <= seen
        assert event_type(event) == "response.completed"


async def test_a_background_end_is_published_only_once_stored(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db") as venna:
        slow_final_writes(venna.server, 0.4)
        queued = await venna.alpha.create(input=TEN_WORDS, model="echo:delay_ms=5", background=True)
        # Polling: no GET answers completed before the row is.
        done = await wait_for_status(venna, queued.id, response_pb2.RESPONSE_STATUS_COMPLETED)
        assert stored_status(venna.db_path, queued.id) == response_pb2.RESPONSE_STATUS_COMPLETED
        assert output_text(done) == TEN_WORDS

        queued = await venna.alpha.create(input=TEN_WORDS, model="echo:delay_ms=5", background=True)
        # Following: the terminal event comes once the final state is stored with it.
        types = []
        async for event in venna.alpha.stub.ResumeResponseStream(
            service_pb2.ResumeResponseStreamRequest(response_id=queued.id), metadata=venna.alpha.metadata
        ):
            types.append(event_type(event))
            if types[-1] == "response.completed":
                assert stored_status(venna.db_path, queued.id) == response_pb2.RESPONSE_STATUS_COMPLETED
        assert_one_terminal_event_last(types, "response.completed")
        assert_one_terminal_event_last(stored_event_types(venna.db_path, queued.id), "response.completed")


@pytest.mark.parametrize(
    ("fields", "status", "terminal"),
    [
        ({"model": "echo"}, response_pb2.RESPONSE_STATUS_COMPLETED, "response.completed"),
        (
            {"model": "echo", "max_output_tokens": 16},
            response_pb2.RESPONSE_STATUS_INCOMPLETE,
            "response.incomplete",
        ),
        ({"model": "echo:fail_after=3"}, response_pb2.RESPONSE_STATUS_FAILED, "response.failed"),
    ],
    ids=["completed", "incomplete", "failed"],
)
async def test_a_background_response_ends_with_one_terminal_event(
    venna: Venna, fields: dict[str, Any], status: int, terminal: str
) -> None:
    queued = await venna.alpha.create(input=f"{TEN_WORDS} {TEN_WORDS}", background=True, **fields)
    final = await wait_for_status(venna, queued.id, status)
    types = stored_event_types(venna.db_path, queued.id)
    assert_one_terminal_event_last(types, terminal)
    replay = await venna.alpha.resume(queued.id)
    assert [event_type(event) for event in replay] == types
    assert getattr(replay[-1], terminal.removeprefix("response.")).response == final


async def test_cancel_and_shutdown_leave_at_most_one_terminal_event(tmp_path: Path) -> None:
    db_path = tmp_path / "venna.db"
    words = " ".join(["word"] * 200)
    async with serving(db_path, background_concurrency=1) as venna:
        running = await venna.alpha.create(input=words, model="echo:delay_ms=20", background=True)
        waiting = await venna.alpha.create(input=TEN_WORDS, model=SLOW, background=True)
        cancelled_waiting = await venna.alpha.create(input="never runs", model=SLOW, background=True)
        await wait_for_status(venna, running.id, response_pb2.RESPONSE_STATUS_IN_PROGRESS)
        assert (
            await venna.alpha.cancel(cancelled_waiting.id)
        ).status == response_pb2.RESPONSE_STATUS_CANCELLED
        other = await venna.beta.create(input=words, model="echo:delay_ms=20", background=True)
        await asyncio.sleep(0.1)
        cancelled = await venna.beta.cancel(other.id)
        assert cancelled.status == response_pb2.RESPONSE_STATUS_CANCELLED
    # The server stopped (0.5 s grace): the running one failed, the queued one stays queued.
    assert stored_status(db_path, running.id) == response_pb2.RESPONSE_STATUS_FAILED
    assert_one_terminal_event_last(stored_event_types(db_path, running.id), "response.failed")
    assert stored_status(db_path, waiting.id) == response_pb2.RESPONSE_STATUS_QUEUED
    assert_one_terminal_event_last(stored_event_types(db_path, waiting.id), None)
    # A cancelled stream simply ends: no terminal event at all.
    for response_id in (cancelled_waiting.id, other.id):
        assert stored_status(db_path, response_id) == response_pb2.RESPONSE_STATUS_CANCELLED
        assert_one_terminal_event_last(stored_event_types(db_path, response_id), None)

    async with serving(db_path) as venna:  # the queued one runs after the restart
        done = await wait_for_status(venna, waiting.id, response_pb2.RESPONSE_STATUS_COMPLETED)
        assert output_text(done) == TEN_WORDS
    assert_one_terminal_event_last(stored_event_types(db_path, waiting.id), "response.completed")
    assert_one_terminal_event_last(stored_event_types(db_path, running.id), "response.failed")


async def test_recovery_settles_a_stream_that_ended_from_its_last_event(tmp_path: Path) -> None:
    """A database where the end of a stream was stored but not the final state (as an earlier
    version could leave it on a crash): recovery takes the end as it was, adding nothing."""
    db_path = tmp_path / "venna.db"
    async with serving(db_path) as venna:
        queued = await venna.alpha.create(input=TEN_WORDS, background=True)
        done = await wait_for_status(venna, queued.id, response_pb2.RESPONSE_STATUS_COMPLETED)
        workspace_id = await workspace_of(venna, venna.alpha.key)
    running = response_pb2.Response()
    running.CopyFrom(done)
    running.status = response_pb2.RESPONSE_STATUS_IN_PROGRESS
    running.ClearField("completed_at")
    store = Store(db_path)
    try:
        assert store.save_response(workspace_id, running)
    finally:
        store.close()
    assert stored_status(db_path, queued.id) == response_pb2.RESPONSE_STATUS_IN_PROGRESS

    async with serving(db_path) as venna:
        assert await venna.alpha.get(queued.id) == done
        assert_one_terminal_event_last(stored_event_types(db_path, queued.id), "response.completed")


# ---------------------------------------------------------------------------- caps


async def test_a_chain_deeper_than_the_limit_is_refused(venna: Venna) -> None:
    venna.server.service.creation.max_chain_depth = 3
    previous = None
    for turn in range(4):  # the fourth has three responses before it: the limit
        fields: dict[str, str] = {} if previous is None else {"previous_response_id": previous}
        previous = (await venna.alpha.create(input=f"turn {turn}", **fields)).id
    with contextlib.closing(sqlite3.connect(venna.db_path)) as db:
        before = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await venna.alpha.create(input="one too many", previous_response_id=previous)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info.reason == "CHAIN_TOO_DEEP"
    assert info.metadata["param"] == "previous_response_id"
    assert "at most 3 responses" in (caught.value.details() or "")
    with contextlib.closing(sqlite3.connect(venna.db_path)) as db:
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == before


@contextlib.asynccontextmanager
async def limited(db_path: Path, **service_limits: int) -> AsyncIterator[VennaServer]:
    """A started server whose service has ``service_limits`` from before its recovery ran."""
    server = VennaServer(start_config(db_path, background_concurrency=1, **service_limits))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0.2)


async def test_background_responses_per_workspace_are_capped(tmp_path: Path) -> None:
    db_path = tmp_path / "venna.db"
    words = " ".join(["word"] * 200)
    async with serving(db_path, background_concurrency=1) as venna:
        venna.server.service.creation.max_background_per_workspace = 2
        first = await venna.alpha.create(input=words, model="echo:delay_ms=20", background=True)
        await venna.alpha.create(input=words, model="echo:delay_ms=20", background=True)
        with contextlib.closing(sqlite3.connect(db_path)) as db:
            before = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        for attempt in (venna.alpha.create, venna.alpha.stream):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await attempt(input="one too many", background=True)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(caught.value).reason == "TOO_MANY_BACKGROUND_RESPONSES"
            assert "the limit is 2" in (caught.value.details() or "")
        with contextlib.closing(sqlite3.connect(db_path)) as db:
            assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == before
        # Foreground responses and other workspaces are not counted.
        assert (await venna.alpha.create(input="quick")).status == response_pb2.RESPONSE_STATUS_COMPLETED
        assert (await venna.beta.create(input="x", background=True)).background
        # A finished one makes room.
        await venna.alpha.cancel(first.id)
        again = await venna.alpha.create(input=words, model="echo:delay_ms=20", background=True)
        assert again.status == response_pb2.RESPONSE_STATUS_QUEUED
        alpha = await workspace_of(venna, venna.alpha.key)
    # Stopped: the queued ones stay queued, and after a restart they count again.
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        [(queued,)] = db.execute(
            "SELECT COUNT(*) FROM responses WHERE status = ? AND workspace_id = ?",
            [response_pb2.RESPONSE_STATUS_QUEUED, alpha],
        ).fetchall()
    assert queued >= 1
    async with limited(db_path, max_background_per_workspace=queued) as server:
        channel = grpc.aio.insecure_channel(server.address)
        try:
            key, _ = await server.store.create_key("alpha")
            stub = service_pb2_grpc.ResponsesServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreateResponse(
                    make_request(input="x", background=True), metadata=(("authorization", f"Bearer {key}"),)
                )
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"the limit is {queued}" in (caught.value.details() or "")
        finally:
            await channel.close(grace=None)


# ---------------------------------------------------------------------------- file modes


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_data_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    db_path = shared / "private" / "deeper" / "venna.db"
    with umask(0o022):
        async with serving(db_path) as venna:
            await venna.alpha.create(input="secret")
            files = [db_path, db_path.with_name("venna.db-wal"), db_path.with_name("venna.db-shm")]
            assert {file.name: mode(file) for file in files} == {file.name: 0o600 for file in files}
    assert mode(shared / "private") == 0o700
    assert mode(shared / "private" / "deeper") == 0o700
    assert mode(shared) == 0o755  # a directory that existed keeps its mode


async def test_an_existing_readable_database_is_tightened(tmp_path: Path) -> None:
    db_path = tmp_path / "venna.db"
    with umask(0o022):
        Store(db_path).close()
        # Another connection keeps the write-ahead log and shared memory files open, as the
        # server of an earlier version left them.
        with contextlib.closing(sqlite3.connect(db_path)) as other:
            other.execute("PRAGMA journal_mode=WAL")
            other.execute("SELECT COUNT(*) FROM responses").fetchone()
            files = [db_path, db_path.with_name("venna.db-wal"), db_path.with_name("venna.db-shm")]
            for file in files:
                file.chmod(0o644)
            async with serving(db_path) as venna:
                await venna.alpha.create(input="secret")
                assert {file.name: mode(file) for file in files} == {file.name: 0o600 for file in files}


async def test_a_stream_whose_response_was_taken_over_ends_in_an_error_not_an_unstored_end(
    tmp_path: Path,
) -> None:
    """Another process took over a stored response while this one streamed it (this one could
    not renew its lease in time) and settled it: the caller is told so, and never sees an end
    that was not stored."""
    async with serving(tmp_path / "venna.db") as venna:
        store = venna.server.store
        workspace = await workspace_of(venna, venna.alpha.key)
        other = Lease("srv_other", 60_000)
        call = venna.alpha.stub.StreamResponse(
            make_request(input=" ".join(["word"] * 40), model="echo:delay_ms=20"),
            metadata=venna.alpha.metadata,
        )
        seen: list[events_pb2.ResponseStreamEvent] = []

        async def read_while_taken_over() -> None:
            async for event in call:
                seen.append(event)
                if len(seen) == 4:
                    response_id = seen[0].created.response.id
                    assert await store.take_over(other, workspace, response_id)
                    taken = await store.get_response(workspace, response_id)
                    assert taken is not None
                    taken.status = response_pb2.RESPONSE_STATUS_FAILED
                    assert await store.save_response(workspace, taken, finished=True, lease=other)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_while_taken_over()
        assert caught.value.code() == grpc.StatusCode.ABORTED
        assert error_info(caught.value).reason == "RESPONSE_TAKEN_OVER"
        assert not [event for event in seen if event.WhichOneof("event") in ("completed", "failed")]
        stored = await venna.alpha.get(seen[0].created.response.id)
        assert stored.status == response_pb2.RESPONSE_STATUS_FAILED  # what the other process stored
