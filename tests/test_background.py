"""Background responses: queued creation, polling, cancellation, resumable streams."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest

from tests.conftest import Venna, event_type, make_request, output_text, serving
from venna.responses.v1 import events_pb2, response_pb2, service_pb2

SLOW = "echo:delay_ms=40"
TEN_WORDS = "one two three four five six seven eight nine ten"


async def wait_for_status(
    venna: Venna, response_id: str, *statuses: int, timeout: float = 10.0
) -> response_pb2.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = await venna.alpha.get(response_id)
        if response.status in statuses:
            return response
        assert time.monotonic() < deadline, f"still {response.status} after {timeout}s"
        await asyncio.sleep(0.02)


async def test_background_returns_queued_then_completes(venna: Venna) -> None:
    queued = await venna.alpha.create(input=TEN_WORDS, model=SLOW, background=True)
    assert queued.status == response_pb2.RESPONSE_STATUS_QUEUED
    assert queued.background
    assert list(queued.output) == []

    done = await wait_for_status(venna, queued.id, response_pb2.RESPONSE_STATUS_COMPLETED)
    assert output_text(done) == TEN_WORDS
    assert done.usage.output_tokens == 10


async def test_background_requires_store(venna: Venna) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await venna.alpha.create(input="x", background=True, store=False)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_resume_replays_from_the_middle_and_follows_live(venna: Venna) -> None:
    queued = await venna.alpha.create(input=TEN_WORDS, model=SLOW, background=True)

    # Read the first few events live, then drop the stream as a disconnecting client would.
    first_part = []
    call = venna.alpha.stub.ResumeResponseStream(
        service_pb2.ResumeResponseStreamRequest(response_id=queued.id), metadata=venna.alpha.metadata
    )
    async for event in call:
        first_part.append(event)
        if event.HasField("output_text_delta") and len(first_part) >= 7:
            break
    call.cancel()
    last_seen = first_part[-1].sequence_number

    rest = await venna.alpha.resume(queued.id, starting_after=last_seen)
    assert rest[0].sequence_number == last_seen + 1
    assert event_type(rest[-1]) == "response.completed"

    whole = await venna.alpha.resume(queued.id)
    assert [event.sequence_number for event in whole] == list(range(len(whole)))
    assert whole[: len(first_part)] == first_part
    assert whole[len(first_part) :] == rest
    assert [event_type(event) for event in whole[:3]] == [
        "response.created",
        "response.queued",
        "response.in_progress",
    ]
    text = "".join(e.output_text_delta.delta for e in whole if e.HasField("output_text_delta"))
    assert text == TEN_WORDS
    assert whole[-1].completed.response == await venna.alpha.get(queued.id)


async def test_streamed_background_response_survives_its_caller(venna: Venna) -> None:
    call = venna.alpha.stub.StreamResponse(
        make_request(input=TEN_WORDS, model=SLOW, background=True), metadata=venna.alpha.metadata
    )
    first = await call.read()
    assert isinstance(first, events_pb2.ResponseStreamEvent)
    assert event_type(first) == "response.created"
    call.cancel()

    done = await wait_for_status(venna, first.created.response.id, response_pb2.RESPONSE_STATUS_COMPLETED)
    assert output_text(done) == TEN_WORDS


async def test_cancel_stops_a_background_response_promptly(venna: Venna) -> None:
    words = " ".join(["word"] * 200)
    queued = await venna.alpha.create(input=words, model="echo:delay_ms=20", background=True)
    await wait_for_status(venna, queued.id, response_pb2.RESPONSE_STATUS_IN_PROGRESS)
    await asyncio.sleep(0.1)

    started = time.monotonic()
    cancelled = await venna.alpha.cancel(queued.id)
    assert time.monotonic() - started < 1.0
    assert cancelled.status == response_pb2.RESPONSE_STATUS_CANCELLED
    stored = await venna.alpha.get(queued.id)
    assert stored.status == response_pb2.RESPONSE_STATUS_CANCELLED
    written = len(output_text(stored).split())
    assert 0 < written < 200

    # Nothing more is written after the cancellation, and cancelling again changes nothing.
    await asyncio.sleep(0.2)
    again = await venna.alpha.cancel(queued.id)
    assert again == stored
    assert len(output_text(await venna.alpha.get(queued.id)).split()) == written

    # A follower of the cancelled response gets the stream up to the cancellation, then its end.
    replay = await venna.alpha.resume(queued.id)
    assert [event.sequence_number for event in replay] == list(range(len(replay)))


async def test_cancel_a_queued_response_that_never_started(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db", background_concurrency=1) as venna:
        client = venna.alpha
        busy = await client.create(input=TEN_WORDS, model=SLOW, background=True)
        waiting = await client.create(input="never runs", model=SLOW, background=True)
        cancelled = await client.cancel(waiting.id)
        assert cancelled.status == response_pb2.RESPONSE_STATUS_CANCELLED
        assert list(cancelled.output) == []
        await client.cancel(busy.id)


async def test_cancel_is_only_for_background_responses(venna: Venna) -> None:
    response = await venna.alpha.create(input="quick")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await venna.alpha.cancel(response.id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_cancel_of_a_finished_background_response_is_idempotent(venna: Venna) -> None:
    queued = await venna.alpha.create(input="fast", background=True)
    done = await wait_for_status(venna, queued.id, response_pb2.RESPONSE_STATUS_COMPLETED)
    assert await venna.alpha.cancel(queued.id) == done


async def test_foreground_stream_cancelled_by_its_client_ends_cancelled(venna: Venna) -> None:
    words = " ".join(["word"] * 200)
    call = venna.alpha.stub.StreamResponse(
        make_request(input=words, model="echo:delay_ms=20"), metadata=venna.alpha.metadata
    )
    created = await call.read()
    assert isinstance(created, events_pb2.ResponseStreamEvent)
    response_id = created.created.response.id
    for _ in range(5):
        await call.read()
    call.cancel()

    stored = await wait_for_status(venna, response_id, response_pb2.RESPONSE_STATUS_CANCELLED, timeout=5)
    written = len(output_text(stored).split())
    await asyncio.sleep(0.2)
    assert len(output_text(await venna.alpha.get(response_id)).split()) == written < 200


async def test_deadline_on_a_unary_create_stops_the_work(venna: Venna) -> None:
    words = " ".join(["word"] * 200)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await venna.alpha.stub.CreateResponse(
            make_request(input=words, model="echo:delay_ms=20"), metadata=venna.alpha.metadata, timeout=0.3
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(0.2)
    with sqlite3.connect(venna.db_path) as db:
        statuses = [row[0] for row in db.execute("SELECT status FROM responses")]
    assert statuses == [response_pb2.RESPONSE_STATUS_CANCELLED]


async def test_resume_needs_a_background_response(venna: Venna) -> None:
    response = await venna.alpha.create(input="quick")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await venna.alpha.resume(response.id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_chaining_on_an_unfinished_response_is_refused(venna: Venna) -> None:
    queued = await venna.alpha.create(input=TEN_WORDS, model=SLOW, background=True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await venna.alpha.create(input="next", previous_response_id=queued.id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await venna.alpha.cancel(queued.id)


async def test_a_failing_model_fails_the_background_response(venna: Venna) -> None:
    queued = await venna.alpha.create(input=TEN_WORDS, model="echo:fail_after=3", background=True)
    failed = await wait_for_status(venna, queued.id, response_pb2.RESPONSE_STATUS_FAILED)
    assert failed.error.code == "server_error"
    assert failed.error.message
    events = await venna.alpha.resume(queued.id)
    assert event_type(events[-1]) == "response.failed"
    assert events[-1].failed.response == failed
